"""HTTP handlers for /debug/pprof/, like Go's net/http/pprof: a pure ASGI app, no framework needed.

Mount it in any Starlette or FastAPI service:

    app.mount("/debug/pprof", PprofApp())

then, from a machine with Go (or the standalone `pprof`):

    go tool pprof http://localhost:8080/debug/pprof/heap               # what is in use now
    go tool pprof http://localhost:8080/debug/pprof/heap?seconds=30    # what grew in 30 s
    go tool pprof http://localhost:8080/debug/pprof/goroutine          # threads and asyncio tasks
    go tool pprof http://localhost:8080/debug/pprof/profile?seconds=30 # where the CPU time goes
    curl http://localhost:8080/debug/pprof/heap?debug=1                # Go's legacy text format
    curl http://localhost:8080/debug/pprof/goroutine?debug=2           # every stack, in full

The endpoints, as in Go:
    heap       Live memory by allocating stack, from tracemalloc (see below).
    goroutine  Every thread's stack and every pending asyncio task's, of every event loop in the
               process: Python's goroutines. Tasks that never finish are the async leak. As in
               Go, where parked goroutines sit in runtime.gopark, `-top` shows where they wait
               (asyncio.tasks.sleep, asyncio.queues.Queue.get...); `-top -cum`, or
               `-top -hide=^asyncio`, shows whose tasks they are.
               debug=1: a count per stack, in Go's text; debug=2: every thread and task in full.
               seconds=N: the growth over N seconds (a profile; not with debug, as in Go).
    profile    CPU profile over seconds=N (default 30), sampled at 100 Hz of CPU time, each sample
               labelled with its thread (`go tool pprof -tags`). One at a time: a request while
               one runs gets 409 Conflict (Go answers 500, but nothing is broken: try later).
               Needs Linux and the event loop in the main thread, as uvicorn runs it, else 501.
    cmdline    The command line, arguments separated by NUL bytes: `sys.orig_argv`, interpreter
               and options included, since Go's os.Args is what the process was started with.
    symbol     Go's symbol lookup, for the addresses in the debug=1 texts: GET answers
               `num_symbols: 1`; a POST body (or GET query) of `+`-separated addresses answers
               `0x<address> <function>` for each one it knows, skipping the rest. `go tool pprof`
               asks it by itself when it reads a debug=1 profile over HTTP.

Query parameters, as in Go:
    debug=N    0 (default): gzipped profile.proto; 1: legacy text. Not a number counts as 0.
    gc=N       N > 0: run a full garbage collection first (heap).
    seconds=N  heap, goroutine: the growth over N seconds (at the end minus at the start);
               profile: how long to sample. Anything but a whole number of seconds from 1 to 300
               is a 400 (where Go's profile would quietly take 30 s).

When tracemalloc is not tracing, `heap` without `seconds` waits for a default window (30 s, as Go's
CPU profile does) instead of answering an empty profile that would read as "no leak": the window
turns tracing on and, when the last window closes, off again.

Heap profiles are built in a forked copy of the process (see `forked`): the service keeps serving,
stalled only for the fork, and the profiler's own allocations never land in its heap.

The profiles show file paths and the shapes of the service's memory: keep these endpoints off public
networks, or set PPROF_ENABLED=false.
"""

from __future__ import annotations

import asyncio
import gc
import html
import os
import re
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from urllib.parse import parse_qsl

from app.pprof import cpu, forked, goroutine, heap
from app.pprof.symbolize import frame_at, function_of

Scope = dict  # ASGI's scope, receive and send, without importing a framework for their types
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

DEFAULT_WINDOW_SECONDS = 30
MAX_WINDOW_SECONDS = 300
MAX_SYMBOL_REQUEST_BYTES = 1 << 20  # about 100,000 addresses: more than any profile has


class BadRequest(Exception):
    """Bad input: the message is the 400 body."""


@dataclass
class Request:
    method: str
    query: dict[str, str]  # the first value of each parameter, as Go's FormValue
    raw_query: str  # the symbol endpoint reads addresses from it, which are not key=value pairs
    body: bytes  # read for POST only


class Answer:
    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = [("content-type", content_type), *(headers or [])]


def _error(status: int, message: str) -> Answer:
    # Go's serveError: plain text, with X-Go-Pprof so `go tool pprof` prints the message.
    return Answer(status, message.encode(), "text/plain; charset=utf-8", [("x-go-pprof", "1")])


def _profile(name: str, body: bytes) -> Answer:
    return Answer(
        200,
        body,
        "application/octet-stream",
        [
            ("content-disposition", f'attachment; filename="{name}"'),
            ("x-content-type-options", "nosniff"),
        ],
    )


def _text(body: str) -> Answer:
    return Answer(
        200, body.encode(), "text/plain; charset=utf-8", [("x-content-type-options", "nosniff")]
    )


_GO_INTEGER = re.compile(r"[+-]?[0-9]+")


def _go_int64(value: str) -> int | None:
    """Go's strconv.ParseInt(value, 10, 64): ASCII digits, an optional sign, in int64; else None."""
    if not _GO_INTEGER.fullmatch(value):
        return None
    number = int(value)
    return number if -(2**63) <= number < 2**63 else None


def _int_or_zero(value: str) -> int:
    """Go's strconv.Atoi as net/http/pprof uses it for debug and gc: anything else is 0."""
    return _go_int64(value) or 0


class PprofApp:
    """The /debug/pprof/ endpoints. `frames` is the stack depth of on-demand tracing windows."""

    def __init__(
        self,
        frames: int = 8,
        default_window_seconds: int = DEFAULT_WINDOW_SECONDS,
        max_window_seconds: int = MAX_WINDOW_SECONDS,
    ) -> None:
        self.frames = frames
        self.default_window_seconds = default_window_seconds
        self.max_window_seconds = max_window_seconds
        self.handlers: dict[str, Callable[[Request], Awaitable[Answer]]] = {
            "cmdline": self.cmdline,
            "goroutine": self.goroutine,
            "heap": self.heap,
            "profile": self.profile,
            "symbol": self.symbol,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        name = _route_path(scope).strip("/")
        methods = ("GET", "HEAD", "POST") if name == "symbol" else ("GET", "HEAD")
        body = b""
        if scope["method"] == "POST" and name == "symbol":
            body = await _read_body(receive, MAX_SYMBOL_REQUEST_BYTES)
        if scope["method"] not in methods:
            answer = _error(405, "Method not allowed")
            answer.headers.append(("allow", ", ".join(methods)))
        elif body is None:
            answer = _error(413, f"Request body larger than {MAX_SYMBOL_REQUEST_BYTES} bytes")
        elif name == "":
            answer = self.index()
        elif name not in self.handlers:
            answer = _error(404, "Unknown profile")
        else:
            raw_query = scope.get("query_string", b"").decode("latin-1")
            request = Request(scope["method"], _first_values(parse_qsl(raw_query)), raw_query, body)
            try:
                answer = await self.handlers[name](request)
            except BadRequest as error:
                answer = _error(400, str(error))
        await _send(answer, scope, send)

    def _seconds(self, query: dict[str, str]) -> int | None:
        """The `seconds` parameter: absent is None; anything but 1..max is a 400, as in Go."""
        if "seconds" not in query:
            return None
        seconds = _go_int64(query["seconds"])
        if seconds is None or seconds <= 0:
            raise BadRequest('invalid value for "seconds" - must be a positive integer')
        if seconds > self.max_window_seconds:
            raise BadRequest(
                f'invalid value for "seconds" - must be at most {self.max_window_seconds}'
            )
        return seconds

    async def heap(self, request: Request) -> Answer:
        """In-use memory by allocating stack, from tracemalloc; `seconds=N` for the growth."""
        query = request.query
        seconds = self._seconds(query)
        if seconds is None and not tracemalloc.is_tracing():
            seconds = self.default_window_seconds
        collect_first = _int_or_zero(query.get("gc", "")) > 0
        if collect_first:
            gc.collect()
        debug = _int_or_zero(query.get("debug", ""))
        if seconds is None:
            built = await asyncio.to_thread(forked.run, partial(heap.build, debug=debug))
        else:
            with heap.tracing_window(self.frames) as traced_before:
                start = await self._window_start(traced_before)
                await asyncio.sleep(seconds)
                if collect_first:
                    gc.collect()
                work = partial(heap.build, debug=debug, start=start)
                built = await asyncio.to_thread(forked.run, work)
        payload = heap.open_answer(built)
        return _text(payload.decode()) if debug > 0 else _profile("heap", payload)

    async def _window_start(self, traced_before: bool) -> bytes:
        """What is in use as a heap window opens; nothing yet if the window just started tracing."""
        if not traced_before:
            return heap.HeapProfile({}, self.frames).to_bytes()
        return await asyncio.to_thread(forked.run, _heap_snapshot)

    async def goroutine(self, request: Request) -> Answer:
        """Every thread and pending asyncio task by stack; `seconds=N` for the growth."""
        seconds = self._seconds(request.query)
        debug = _int_or_zero(request.query.get("debug", ""))
        # Captured here, in the event loop's thread, so that the loop's tasks stand still.
        if seconds is not None:
            if debug != 0:
                raise BadRequest("seconds and debug params are incompatible")
            start = goroutine.count_stacks(goroutine.capture())
            await asyncio.sleep(seconds)
            growth = goroutine.count_stacks(goroutine.capture()).minus(start)
            return _profile("goroutine-delta", await asyncio.to_thread(goroutine.encode, growth))
        goroutines = goroutine.capture()
        if debug >= 2:
            return _text(await asyncio.to_thread(goroutine.render_stacks, goroutines))
        profile = goroutine.count_stacks(goroutines)
        if debug == 1:
            return _text(await asyncio.to_thread(goroutine.render_counts, profile))
        return _profile("goroutine", await asyncio.to_thread(goroutine.encode, profile))

    async def profile(self, request: Request) -> Answer:
        """A CPU profile of the next `seconds` (default 30), while the service goes on."""
        seconds = self._seconds(request.query) or self.default_window_seconds
        try:
            profile = await cpu.profile_for(seconds)
        except cpu.ProfilingInUse as error:
            return _error(409, f"Could not enable CPU profiling: {error}")
        except cpu.ProfilingUnavailable as error:
            return _error(501, f"Could not enable CPU profiling: {error}")
        return _profile("profile", await asyncio.to_thread(cpu.encode, profile))

    async def cmdline(self, request: Request) -> Answer:
        """The command line, NUL-separated, in the bytes the process was given."""
        argv = b"\x00".join(os.fsencode(argument) for argument in sys.orig_argv)
        return Answer(
            200, argv, "text/plain; charset=utf-8", [("x-content-type-options", "nosniff")]
        )

    async def symbol(self, request: Request) -> Answer:
        """Go's symbol lookup: `+`-separated addresses in, `0x<address> <function>` lines out."""
        words = request.body if request.method == "POST" else request.raw_query.encode("latin-1")
        # pprof only cares whether the count is 0 (no symbols at all), as Go's comment says.
        lines = ["num_symbols: 1"]
        for word in words.split(b"+"):
            address = _address(word)
            frame = frame_at(address) if address else None
            if frame is not None:
                lines.append(f"{address:#x} {function_of(*frame)[0]}")
        return _text("\n".join(lines) + "\n")

    def index(self) -> Answer:
        profiles = self._profiles()
        rows = "".join(
            f"<tr><td>{html.escape(count)}</td><td><a href='{name}?debug=1'>{name}</a></td></tr>\n"
            for name, count, _ in profiles
        )
        descriptions = "".join(
            f"<li><div class=profile-name>{name}: </div> {html.escape(text)}</li>\n"
            for name, _, text in profiles
        )
        page = _INDEX_PAGE.format(rows=rows, descriptions=descriptions)
        return Answer(200, page.encode(), "text/html; charset=utf-8")

    def _profiles(self) -> list[tuple[str, str, str]]:
        """(name, count, description) for each profile this process can really provide, by name.

        As in Go: the profiles and cmdline; symbol is a service for pprof, not listed.
        """
        if tracemalloc.is_tracing():
            traced = tracemalloc.get_traced_memory()[0]
            count = f"{traced / 2**20:.1f} MiB"
            status = (
                f"Tracing now, {tracemalloc.get_traceback_limit()} frames deep: heap shows every "
                "live block allocated since tracing started."
            )
        else:
            count = "off"
            status = (
                "Not tracing now: heap opens a window (seconds=N, default "
                f"{self.default_window_seconds}) that traces while it lasts."
            )
        return [
            (
                "cmdline",
                "0",  # as in Go: not a count profile
                "The command line invocation of the current program: the interpreter, its "
                "options, the script and its arguments.",
            ),
            (
                "goroutine",
                str(goroutine.count()),
                "Stack traces of all current threads and pending asyncio tasks (of every event "
                "loop): Python's goroutines. Specify seconds=N for the growth over N seconds.",
            ),
            (
                "heap",
                count,
                "Live memory by allocating stack, from tracemalloc: exact, not sampled. Specify "
                "the gc GET parameter to collect garbage first, seconds=N for the growth over N "
                f"seconds. {status}",
            ),
            (
                "profile",
                "1" if cpu.in_use() else "0",
                "CPU profile. You can specify the duration in the seconds GET parameter. After "
                "you get the profile file, use the go tool pprof command to investigate the "
                "profile. Sampled at 100 Hz of CPU time; one at a time (the count is 1 while "
                "one is being taken).",
            ),
        ]


def _address(word: bytes) -> int:
    """An address as Go's strconv.ParseUint(word, 0, 64) reads it; 0 if it is not one."""
    try:
        address = int(word.decode("ascii"), 0)
    except (UnicodeDecodeError, ValueError):
        return 0
    return address if 0 < address < 1 << 64 else 0


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None if it is longer than `limit` bytes."""
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


def _first_values(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Go's r.FormValue: the first value of a repeated parameter."""
    query: dict[str, str] = {}
    for key, value in pairs:
        query.setdefault(key, value)
    return query


def _heap_snapshot(in_child: bool) -> bytes:
    return heap.capture(stop_tracing=in_child).to_bytes()


def _route_path(scope: Scope) -> str:
    """The path below the mount point, whether the framework strips the prefix or not."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :]
    return path


async def _send(answer: Answer, scope: Scope, send: Send) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    body = b"" if scope["method"] == "HEAD" else answer.body
    await send({"type": "http.response.body", "body": body})


_INDEX_PAGE = """<html>
<head>
<title>/debug/pprof/</title>
<style>
.profile-name{{
\tdisplay:inline-block;
\twidth:6rem;
}}
</style>
</head>
<body>
/debug/pprof/<br>
<br>
Types of profiles available:
<table>
<thead><td>Count</td><td>Profile</td></thead>
{rows}</table>
<a href="goroutine?debug=2">full goroutine stack dump</a>
<br>
<p>
Profile Descriptions:
<ul>
{descriptions}</ul>
</p>
<p>Read them with <code>go tool pprof http://HOST/debug/pprof/heap</code>. Keep these endpoints off
public networks: they show file paths and the shapes of this service's memory.</p>
</body>
</html>
"""
