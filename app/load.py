"""A small HTTP/1.1 load generator: `concurrency` workers, each with one keep-alive connection.

Pure asyncio streams and the standard library, so the client stays cheap next to the service it
loads (both share the same two cores in the demo). It speaks just enough HTTP/1.1 for `GET`:
`Content-Length`, chunked and close-delimited bodies, and `Connection: close`.

A request that gets no complete response (refused, reset, timed out, garbled) counts as an error,
as does any non-2xx status. The worker then reconnects, backing off while the target is down so a
dead server costs a few attempts a second rather than a busy loop. A target that has answered
nothing for TARGET_GONE_SECONDS and cannot be connected to (refused, or closed before answering)
is gone: the run stops there and says so, rather than spend its budget on it. A target that only
hangs is not gone: its requests time out, one by one.

At the deadline of a run with a duration, the requests in flight are cancelled and not counted.

`{n}` in the URL's path becomes each request's number (1, 2, ...; 0 for the check made first), so
that every request asks for a path of its own: `/orders/{n}`, as a service sees many users.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlsplit

CHECK_TIMEOUT_SECONDS = 5.0
REQUEST_TIMEOUT_SECONDS = 20.0  # hey's default: a stuck request becomes an error, not a hang
RECONNECT_DELAY_SECONDS = 0.05
RECONNECT_DELAY_MAX_SECONDS = 1.0
BODILESS_STATUSES = (204, 304)
TARGET_GONE_SECONDS = 10.0  # longer than a container takes to restart after an out-of-memory kill
NUMBER = b"{n}"  # in a URL's path: each request's own number

ProgressCallback = Callable[[int, int, float], None]


class TargetUnreachable(Exception):
    """The target URL did not answer the check made before the load starts."""


class BadResponse(Exception):
    """The server sent something that is not an HTTP/1.x response we can frame."""


class TargetGone(Exception):
    """The target has not answered for TARGET_GONE_SECONDS, and refuses or drops connections."""


# A request that ends in one of these got no usable response (OSError covers resets and timeouts).
NO_RESPONSE_ERRORS = (
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    BadResponse,
    ValueError,  # a status or length that is not a number
)


@dataclass
class LoadResult:
    requests: int  # responses received, any status
    errors: int  # requests without a response, plus non-2xx responses
    duration_seconds: float
    latencies_seconds: array[float]  # one per response; an array of doubles stays compact
    status_counts: dict[int, int]
    stop_reason: str | None = None  # why the run stopped before its end, if it did

    def successes(self) -> int:
        return sum(count for status, count in self.status_counts.items() if status // 100 == 2)

    def requests_per_second(self) -> float:
        return self.requests / self.duration_seconds if self.duration_seconds > 0 else 0.0

    def connection_errors(self) -> int:
        non_2xx = sum(count for status, count in self.status_counts.items() if status // 100 != 2)
        return self.errors - non_2xx

    def percentile(self, p: float) -> float:
        """Latency at percentile `p` (0..100) in seconds, interpolated linearly between ranks.

        NaN when no response was received.
        """
        if not 0 <= p <= 100:
            raise ValueError(f"percentile must be between 0 and 100, not {p}")
        ordered = self._sorted_latencies
        if not ordered:
            return math.nan
        rank = (len(ordered) - 1) * p / 100
        low = math.floor(rank)
        high = min(low + 1, len(ordered) - 1)
        interpolated = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
        return min(interpolated, ordered[high])  # rounding must not step past the next rank

    @cached_property
    def _sorted_latencies(self) -> list[float]:
        return sorted(self.latencies_seconds)

    def summary(self) -> str:
        lines = [
            f"requests:    {self.requests}",
            f"errors:      {self.errors} ({self.connection_errors()} without a response)",
            f"duration:    {self.duration_seconds:.2f} s",
            f"req/s:       {self.requests_per_second():.1f}",
        ]
        for label, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)):
            latency = self.percentile(p)
            shown = "-" if math.isnan(latency) else f"{latency * 1000:.2f} ms"
            lines.append(f"latency {label}: {shown}")
        counts = sorted(self.status_counts.items())
        statuses = ", ".join(f"{status}: {count}" for status, count in counts) or "-"
        lines.append(f"statuses:    {statuses}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    request: bytes  # the whole GET request, encoded once; with `{n}` in it if numbered
    numbered: bool = False  # `{n}` in the path: request_for fills in each request's number

    def request_for(self, number: int) -> bytes:
        if not self.numbered:
            return self.request
        return self.request.replace(NUMBER, str(number).encode())

    @classmethod
    def from_url(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme == "https":
            raise ValueError(f"{url}: https is not supported; use an http:// URL")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url}: not an http:// URL")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n"
            "User-Agent: leaker-load\r\nAccept: */*\r\n\r\n"
        ).encode("latin-1")
        numbered = NUMBER.decode() in path
        return cls(url, parts.hostname, parts.port or 80, request, numbered)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response, body included; return its status and whether the connection stays open."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or len(head) < 12:
        raise BadResponse(f"not an HTTP/1.x response: {head[:40]!r}")
    status = int(head[9:12])
    headers = head.lower()
    connection = _header(headers, b"connection")
    keep_alive = head[5:8] == b"1.1" and (connection is None or b"close" not in connection)
    if 100 <= status < 200:  # an interim response (such as 103): the real one follows
        return await read_response(reader)
    if status in BODILESS_STATUSES:
        return status, keep_alive
    transfer_encoding = _header(headers, b"transfer-encoding")
    content_length = _header(headers, b"content-length")
    if transfer_encoding is not None and b"chunked" in transfer_encoding:
        await _read_chunked_body(reader)
    elif content_length is not None:
        await reader.readexactly(int(content_length))
    else:  # no framing: the body runs until the server closes
        await reader.read()
        keep_alive = False
    return status, keep_alive


def _header(headers: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (both lower case) in a response head, or None."""
    start = headers.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    return headers[start : headers.index(b"\r\n", start)].strip()


async def _read_chunked_body(reader: asyncio.StreamReader) -> None:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            break
        await reader.readexactly(size + 2)  # the chunk and its CRLF
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, up to the blank line
        pass


class _Load:
    """Shared state of one run; every worker runs on the same event loop, so no locks."""

    def __init__(self, target: Target, requests: int | None) -> None:
        self.target = target
        self.remaining = requests  # None: no request budget
        self.claimed = 0  # requests taken from the budget so far: the last one's number
        self.started = time.monotonic()
        self.last_answer = self.started  # the target's check has just answered
        self.done = 0
        self.errors = 0
        self.latencies: array[float] = array("d")
        self.status_counts: dict[int, int] = {}

    def claim(self) -> bool:
        """Take the next request from the budget, if the run is not over: number `claimed`."""
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        self.claimed += 1
        return True

    async def worker(self) -> None:
        target = self.target
        latencies = self.latencies
        status_counts = self.status_counts
        backoff = _Backoff()
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        fresh = False  # the connection has not answered yet
        try:
            while self.claim():
                request = target.request_for(self.claimed)  # before an await lets others claim
                if writer is None:
                    try:
                        reader, writer = await asyncio.open_connection(target.host, target.port)
                    except OSError as error:
                        self.errors += 1
                        self.check_gone(error)
                        await backoff.wait()
                        continue
                    fresh = True
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                        writer.write(request)
                        status, keep_alive = await read_response(reader)
                except NO_RESPONSE_ERRORS as error:
                    self.errors += 1
                    writer.close()
                    writer = None
                    if fresh:  # it accepts connections but does not answer: treat it as down
                        if not isinstance(error, TimeoutError):  # hanging is not gone
                            self.check_gone(error)
                        await backoff.wait()
                    continue
                self.last_answer = time.monotonic()
                latencies.append(time.perf_counter() - started)
                self.done += 1
                status_counts[status] = status_counts.get(status, 0) + 1
                if not 200 <= status < 300:
                    self.errors += 1
                if fresh:
                    fresh = False
                    backoff.reset()
                if not keep_alive:
                    writer.close()
                    writer = None
        finally:
            if writer is not None:
                writer.close()

    def check_gone(self, error: Exception) -> None:
        """After a connection that failed: raise TargetGone if nothing has answered for long."""
        silent = time.monotonic() - self.last_answer
        if silent >= TARGET_GONE_SECONDS:
            raise TargetGone(
                f"{self.target.url} has not answered for {silent:.1f} s ({_reason(error)})"
            )

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def report_progress(self, on_progress: ProgressCallback, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            on_progress(self.done, self.errors, self.elapsed())


class _Backoff:
    """Waits longer after each failure in a row, so a target that is down is not hammered."""

    def __init__(self) -> None:
        self.delay = RECONNECT_DELAY_SECONDS

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, RECONNECT_DELAY_MAX_SECONDS)

    def reset(self) -> None:
        self.delay = RECONNECT_DELAY_SECONDS


async def check_target(target: Target) -> None:
    """One request with a short timeout, so a wrong URL fails fast and clearly."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            try:
                writer.write(target.request_for(0))
                await read_response(reader)
            finally:
                writer.close()
    except TimeoutError as error:
        raise TargetUnreachable(
            f"{target.url} did not answer within {CHECK_TIMEOUT_SECONDS:g} s"
        ) from error
    except OSError as error:
        raise TargetUnreachable(f"cannot reach {target.url}: {_reason(error)}") from error
    except asyncio.IncompleteReadError as error:
        raise TargetUnreachable(f"{target.url} closed the connection without answering") from error
    except NO_RESPONSE_ERRORS as error:  # anything else that is not an HTTP response
        raise TargetUnreachable(f"{target.url} did not answer with HTTP: {error}") from error


def _reason(error: Exception) -> str:
    """Why a connection failed, in a few words."""
    if isinstance(error, OSError):
        # asyncio words a refused connection "Connect call failed"; the errno says why.
        # (Name lookup errors have negative codes and a good message already.)
        has_errno = error.errno is not None and error.errno > 0
        return os.strerror(error.errno) if has_errno else error.strerror or str(error)
    if isinstance(error, asyncio.IncompleteReadError):
        return "connection closed without an answer"
    return str(error) or type(error).__name__


async def run_load(
    url: str,
    concurrency: int = 100,
    requests: int | None = None,
    duration: float | None = None,
    on_progress: ProgressCallback | None = None,
    progress_interval: float = 0.5,
) -> LoadResult:
    """Send GET requests to `url` from `concurrency` keep-alive connections.

    Stops after `requests` requests in total, after `duration` seconds (cancelling the requests
    in flight), or, with neither, when cancelled; a cancelled run returns what it did. Stops early
    when the target is gone (see the module's comment), with the reason in `stop_reason`.
    `on_progress(done, errors, elapsed)` is called every `progress_interval` seconds and once at
    the end. The request that checks the target first is not counted. Raises TargetUnreachable if
    that check fails, ValueError for a URL or an argument it cannot use.
    """
    target = Target.from_url(url)
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    if requests is not None and requests < 1:
        raise ValueError(f"requests must be at least 1, not {requests}")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be positive, not {duration}")
    if progress_interval <= 0:
        raise ValueError(f"progress_interval must be positive, not {progress_interval}")
    await check_target(target)

    load = _Load(target, requests)
    worker_count = concurrency if requests is None else min(concurrency, requests)
    workers = [asyncio.create_task(load.worker()) for _ in range(worker_count)]
    tasks = list(workers)
    if on_progress is not None:
        tasks.append(asyncio.create_task(load.report_progress(on_progress, progress_interval)))
    stop_reason = None
    try:
        async with asyncio.timeout(duration):  # None: no deadline
            await asyncio.gather(*workers)
    except TimeoutError:  # the deadline; the workers catch their own requests' timeouts
        pass
    except TargetGone as gone:
        stop_reason = str(gone)
    except asyncio.CancelledError:
        # "Run until cancelled": what was done so far is the result. The cancellation is handled
        # here, so the task is no longer marked as being cancelled (asyncio.timeout relies on it).
        current_task = asyncio.current_task()
        if current_task is not None:
            current_task.uncancel()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = load.elapsed()
    if on_progress is not None:
        on_progress(load.done, load.errors, elapsed)
    return LoadResult(
        load.done, load.errors, elapsed, load.latencies, load.status_counts, stop_reason
    )
