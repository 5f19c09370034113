"""The load generator counts what the server sees, frames every kind of body, survives outages."""

from __future__ import annotations

import asyncio
import math
import statistics
from array import array
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import load as load_module
from app.load import LoadResult, TargetUnreachable, run_load
from tests.service import free_port, running_service

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nOK\n"
RUN_TIMEOUT_SECONDS = 30  # a run that hangs fails the test instead of the whole suite


class TinyServer:
    """An HTTP/1.1 server on a free loopback port that counts the requests it reads and answers.

    Each request gets `response`, then the connection is closed if `closes`. With `drop_every=k`,
    every k-th request on a connection is read and the connection closed without an answer. With
    `answers=n`, only the first n requests of all are answered; each later one is read, then
    `then` happens: "hang" (no answer, the connection left open) or "close" (closed unanswered).
    """

    def __init__(
        self,
        response: bytes = OK,
        closes: bool = False,
        drop_every: int | None = None,
        answers: int | None = None,
        then: str = "hang",
    ) -> None:
        self.response = response
        self.closes = closes
        self.drop_every = drop_every
        self.answers = answers
        self.then = then
        self.port = 0
        self.connections = 0
        self.received = 0
        self.answered = 0
        self.paths: list[bytes] = []  # of every request read, in order
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every open connection, like a server that crashed."""
        if self.server is None:
            return
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        on_this_connection = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.received += 1
                self.paths.append(head.split(b" ", 2)[1])
                on_this_connection += 1
                if self.drop_every and on_this_connection % self.drop_every == 0:
                    return
                if self.answers is not None and self.answered >= self.answers:
                    if self.then == "close":
                        return
                    await asyncio.Event().wait()  # until the server stops and cancels this
                writer.write(self.response)
                self.answered += 1
                if self.closes:
                    return
        finally:
            self.writers.discard(writer)
            writer.close()


def run_with_server(
    server: TinyServer, load: Callable[[TinyServer], Awaitable[LoadResult]]
) -> LoadResult:
    async def main() -> LoadResult:
        await server.start()
        try:
            return await asyncio.wait_for(load(server), RUN_TIMEOUT_SECONDS)
        finally:
            await server.stop()

    return asyncio.run(main())


def test_counts_every_request_once_over_one_connection_per_worker() -> None:
    server = TinyServer()
    result = run_with_server(server, lambda s: run_load(s.url, concurrency=7, requests=523))

    assert result.requests == 523
    assert server.answered == 523 + 1  # plus the reachability check made first
    assert server.connections == 7 + 1  # keep-alive: one connection per worker, plus the check
    assert result.errors == 0
    assert result.status_counts == {200: 523}
    assert len(result.latencies_seconds) == 523


def test_n_in_the_path_gives_every_request_a_path_of_its_own() -> None:
    server = TinyServer()
    path = "orders/{n}?from=load"
    result = run_with_server(server, lambda s: run_load(s.url + path, concurrency=7, requests=300))

    assert result.requests == 300
    # 0 is the reachability check's; then one path each, whichever worker sent it
    expected = [b"/orders/%d?from=load" % number for number in range(301)]
    assert sorted(server.paths) == sorted(expected)


def test_non_2xx_responses_are_counted_as_errors() -> None:
    server = TinyServer(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\noops\n")
    result = run_with_server(server, lambda s: run_load(s.url, concurrency=3, requests=40))

    assert result.requests == 40
    assert result.errors == 40
    assert result.connection_errors() == 0
    assert result.status_counts == {500: 40}


BIG_BODY = b"x" * 300_000  # several times the stream reader's buffer
# name: (response, whether the server closes the connection after it)
FRAMINGS = {
    "content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BIG_BODY), BIG_BODY),
        False,
    ),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nOK\n\r\n"
        b"1a;name=value\r\n" + b"y" * 0x1A + b"\r\n"
        b"0\r\nX-Trailer: 1\r\n\r\n",
        False,
    ),
    "chunked, upper-case header": (
        b"HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        False,
    ),
    "no content": (b"HTTP/1.1 204 No Content\r\n\r\n", False),
    "interim response first": (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK, False),
    "connection close": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nOK\n",
        True,
    ),
    "until close": (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until the end", True),
    "HTTP/1.0": (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nOK\n", True),
}


@pytest.mark.parametrize(("response", "closes"), FRAMINGS.values(), ids=FRAMINGS.keys())
def test_reads_every_kind_of_response_body_exactly(response: bytes, closes: bool) -> None:
    server = TinyServer(response, closes)
    result = run_with_server(server, lambda s: run_load(s.url, concurrency=4, requests=60))

    # A body read too short or too long would garble the next response into an error.
    assert result.errors == 0
    assert result.requests == 60
    assert server.answered == 60 + 1
    assert sum(result.status_counts.values()) == 60
    if not closes:  # kept alive: one connection per worker, plus the check
        assert server.connections == 4 + 1


def test_connections_closed_mid_run_count_errors_and_the_run_finishes() -> None:
    server = TinyServer(drop_every=5)
    result = run_with_server(server, lambda s: run_load(s.url, concurrency=4, requests=200))

    # Every request either got its answer or is an error; workers reconnected after each drop.
    assert result.requests == server.answered - 1
    assert result.requests + result.errors == 200
    assert result.connection_errors() == result.errors > 0
    assert server.connections > 4 + 1


def test_a_server_that_goes_away_costs_errors_and_is_reconnected_to() -> None:
    first = TinyServer()
    second = TinyServer()

    async def outage(server: TinyServer) -> LoadResult:
        load = asyncio.create_task(run_load(server.url, concurrency=4, duration=3.0))
        await asyncio.sleep(0.7)
        await server.stop()
        await asyncio.sleep(1.0)
        second.port = server.port
        await second.start()
        try:
            return await load
        finally:
            await second.stop()

    result = run_with_server(first, outage)

    assert result.errors > 0
    assert second.answered > 0  # the workers found the server again
    # An answer in flight when the first server crashed may be lost on the way.
    assert 0 < result.requests <= first.answered - 1 + second.answered
    # Waiting between attempts: 4 workers over a 1 s outage make a handful of attempts each,
    # where retrying in a loop would make thousands.
    assert result.errors < 4 * 20


def test_a_duration_bounds_the_run() -> None:
    server = TinyServer()
    result = run_with_server(server, lambda s: run_load(s.url, concurrency=5, duration=0.5))

    assert 0.5 <= result.duration_seconds < 1.5
    # At the deadline each worker's request in flight is cut short, answered or not: not counted.
    assert server.answered - 1 - 5 <= result.requests <= server.answered - 1
    assert result.requests > 0
    assert result.errors == 0


def test_a_duration_cuts_short_the_requests_still_waiting_at_the_deadline() -> None:
    server = TinyServer(answers=1)  # the check, then nothing: every request hangs
    result = run_with_server(server, lambda s: run_load(s.url, concurrency=3, duration=1.0))

    # Not after the 20 s each request may wait for its answer.
    assert 1.0 <= result.duration_seconds < 2.0
    assert server.received > 1
    assert result.requests == 0
    assert result.errors == 0  # cut short by the deadline: not the target's fault
    assert result.stop_reason is None


@pytest.mark.parametrize("then", ["crash", "close"])
def test_a_target_gone_for_good_stops_the_run_with_the_reason(
    then: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(load_module, "TARGET_GONE_SECONDS", 1.0)

    async def crash_soon(server: TinyServer) -> LoadResult:
        load = asyncio.create_task(run_load(server.url, concurrency=4, requests=1_000_000))
        await asyncio.sleep(0.3)
        await server.stop()
        return await load

    if then == "crash":  # it stops listening: connections are refused
        server = TinyServer()
        result = run_with_server(server, crash_soon)
    else:  # it accepts connections and closes them unanswered, as Docker's proxy does
        server = TinyServer(answers=300, then="close")
        result = run_with_server(server, lambda s: run_load(s.url, concurrency=4, requests=10**6))

    print(result.stop_reason, result.duration_seconds, result.errors)
    assert result.stop_reason is not None
    assert server.url in result.stop_reason and "has not answered for 1." in result.stop_reason
    reason = "Connection refused" if then == "crash" else "closed without an answer"
    assert reason in result.stop_reason
    assert result.duration_seconds < 4.0
    assert 0 < result.requests < 1_000_000
    assert result.errors < 4 * 20  # backing off meanwhile


def test_a_target_that_only_hangs_is_not_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_module, "TARGET_GONE_SECONDS", 0.3)
    monkeypatch.setattr(load_module, "REQUEST_TIMEOUT_SECONDS", 0.2)
    server = TinyServer(answers=1)
    result = run_with_server(server, lambda s: run_load(s.url, concurrency=2, duration=1.5))

    # Its requests time out one after another until the deadline.
    assert result.stop_reason is None
    assert 1.5 <= result.duration_seconds < 2.5
    assert result.errors >= 2
    assert result.requests == 0


def test_a_cancelled_run_returns_what_it_did() -> None:
    async def cancel_after_a_while(server: TinyServer) -> LoadResult:
        load = asyncio.create_task(run_load(server.url, concurrency=5))
        await asyncio.sleep(0.5)
        load.cancel()
        result = await load
        assert load.cancelling() == 0  # handled: asyncio.timeout around the run still works
        return result

    server = TinyServer()
    result = run_with_server(server, cancel_after_a_while)

    # A request answered just as the run was cancelled may not have been read.
    assert 0 < result.requests <= server.answered - 1
    assert result.errors == 0


def test_progress_is_reported_and_ends_with_the_final_counts() -> None:
    reports: list[tuple[int, int, float]] = []

    async def slow_load(server: TinyServer) -> LoadResult:
        return await run_load(
            server.url,
            concurrency=2,
            duration=0.6,
            on_progress=lambda *report: reports.append(report),
            progress_interval=0.1,
        )

    result = run_with_server(TinyServer(), slow_load)

    assert len(reports) >= 4
    assert reports[-1][:2] == (result.requests, result.errors)
    done = [report[0] for report in reports]
    elapsed = [report[2] for report in reports]
    assert done == sorted(done) and elapsed == sorted(elapsed)


def test_a_closed_port_is_reported_before_the_load_starts() -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(TargetUnreachable) as raised:
        asyncio.run(run_load(url, requests=10))

    assert url in str(raised.value)
    assert "Connection refused" in str(raised.value)


def test_https_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="https"):
        asyncio.run(run_load("https://127.0.0.1:1/", requests=1))


def result_of(latencies: list[float]) -> LoadResult:
    return LoadResult(len(latencies), 0, 1.0, array("d", latencies), {200: len(latencies)})


def test_percentiles_interpolate_between_ranks() -> None:
    result = result_of([0.004, 0.001, 0.003, 0.002])

    assert result.percentile(0) == 0.001
    assert result.percentile(25) == pytest.approx(0.00175)
    assert result.percentile(50) == pytest.approx(0.0025)
    assert result.percentile(100) == 0.004


def test_percentiles_of_no_responses_are_not_numbers() -> None:
    result = LoadResult(0, 3, 1.0, array("d"), {})

    assert math.isnan(result.percentile(50))
    assert "latency p50: -" in result.summary()


latency_lists = st.lists(
    st.floats(min_value=0, max_value=60, allow_nan=False), min_size=2, max_size=200
)


@given(latency_lists)
def test_percentiles_agree_with_statistics_quantiles(latencies: list[float]) -> None:
    result = result_of(latencies)
    cut_points = statistics.quantiles(latencies, n=100, method="inclusive")

    for p, expected in enumerate(cut_points, start=1):
        assert result.percentile(p) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result.percentile(0) == min(latencies)
    assert result.percentile(100) == max(latencies)


@given(latency_lists, st.floats(0, 100), st.floats(0, 100))
def test_percentiles_never_decrease(latencies: list[float], p: float, q: float) -> None:
    result = result_of(latencies)
    low, high = sorted((p, q))

    assert result.percentile(low) <= result.percentile(high)


def test_summary_shows_counts_rate_and_latencies() -> None:
    result = LoadResult(4, 1, 2.0, array("d", [0.001, 0.002, 0.003, 0.010]), {200: 3, 503: 1})
    summary = result.summary()

    assert "requests:    4" in summary
    assert "errors:      1 (0 without a response)" in summary
    assert "req/s:       2.0" in summary
    assert "latency p50: 2.50 ms" in summary
    assert "latency max: 10.00 ms" in summary
    assert "200: 3, 503: 1" in summary


def test_loads_the_real_service(tmp_path: Path) -> None:
    with running_service({"LEAK_MODE": "fixed", "PPROF_ENABLED": "false"}, tmp_path) as service:
        result = asyncio.run(run_load(service.url + "/", concurrency=10, requests=300))

    assert result.requests == 300
    assert result.errors == 0
    assert result.status_counts == {200: 300}
