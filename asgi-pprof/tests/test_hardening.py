"""What a hostile or careless client must not be able to do: keep profiles running after it has
gone, freeze the event loop, get a 500, or make heap builds pile up."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asgi_pprof import cpu, forked, handlers
from asgi_pprof.handlers import PprofApp

from server import serving

Message = dict[str, Any]


class Client:
    """An ASGI client that sends a request, then leaves after `leave_after` seconds (or never)."""

    def __init__(self, body: bytes = b"", leave_after: float | None = None) -> None:
        self.body = body
        self.leave_after = leave_after
        self.sent: list[Message] = []
        self._body_sent = False

    async def receive(self) -> Message:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if self.leave_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.leave_after or 0)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return self.sent[0]["status"] if self.sent else None

    @property
    def content(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])


def scope(path: str, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    target, _, query = path.partition("?")
    return {
        "type": "http",
        "method": method,
        "path": target,
        "root_path": "",
        "query_string": query.encode("latin-1"),
        "headers": headers or [],
    }


async def call(app: PprofApp, path: str, client: Client, method: str = "GET", **kw: Any) -> Client:
    await app(scope(path, method, **kw), client.receive, client.send)
    return client


class Builds(list[float]):
    """When each heap build (a forked child) started, and how many ran at once at most."""

    most = 0


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> Builds:
    builds = Builds()
    running = [0]
    real_run = forked.run

    def counting_run(work: Callable[[bool], bytes], *args: Any, **kwargs: Any) -> bytes:
        builds.append(time.monotonic())
        running[0] += 1
        builds.most = max(builds.most, running[0])
        try:
            time.sleep(0.2)  # long enough for the requests that come meanwhile to pile up
            return real_run(work, *args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(forked, "run", counting_run)
    return builds


@pytest.fixture
def not_tracing() -> Iterator[None]:
    assert not tracemalloc.is_tracing(), "another test left tracemalloc on"
    yield
    if tracemalloc.is_tracing():
        tracemalloc.stop()


# 1. A profile whose client has gone stops at once.


@pytest.mark.usefixtures("not_tracing")
def test_a_heap_window_whose_client_leaves_stops_tracing_and_forks_nothing(
    forks: Builds,
) -> None:
    async def scenario() -> tuple[Client, float, bool]:
        started = time.monotonic()
        task = asyncio.create_task(call(PprofApp(), "/heap?seconds=30", Client(leave_after=0.3)))
        await asyncio.sleep(0.1)
        traced_meanwhile = tracemalloc.is_tracing()
        client = await task
        return client, time.monotonic() - started, traced_meanwhile

    client, seconds, traced_meanwhile = asyncio.run(scenario())
    assert traced_meanwhile  # the window had opened
    assert seconds < 2 and client.sent == []  # no answer: nobody to read it
    assert not tracemalloc.is_tracing()
    assert forks == []  # the window never got to build its profile


def test_a_cpu_profile_whose_client_leaves_stops_and_frees_the_profiler() -> None:
    async def scenario() -> tuple[float, Client]:
        started = time.monotonic()
        await call(PprofApp(), "/profile?seconds=30", Client(leave_after=0.3))
        seconds = time.monotonic() - started
        second = await call(PprofApp(), "/profile?seconds=1", Client())
        return seconds, second

    seconds, second = asyncio.run(scenario())
    assert seconds < 2
    assert not cpu.in_use()
    assert second.status == 200  # not 409: the abandoned profile released the profiler


def test_a_goroutine_window_whose_client_leaves_stops() -> None:
    async def scenario() -> float:
        started = time.monotonic()
        await call(PprofApp(), "/goroutine?seconds=30", Client(leave_after=0.2))
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 2


def test_over_http_a_client_that_times_out_stops_its_window(tmp_path: Path) -> None:
    """What `curl -m1 .../heap?seconds=30` does to a real server: tracing stops when it leaves."""
    with serving("example_service:app", tmp_path) as server:
        with pytest.raises(OSError):  # urllib's timeout
            urllib.request.urlopen(server.url + "/debug/pprof/heap?seconds=30", timeout=1)
        deadline = time.monotonic() + 5
        while True:
            with urllib.request.urlopen(server.url + "/debug/pprof/", timeout=10) as answer:
                index = answer.read().decode()
            if "Not tracing now" in index or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert "Not tracing now" in index
        with pytest.raises(OSError):
            urllib.request.urlopen(server.url + "/debug/pprof/profile?seconds=30", timeout=1)
        time.sleep(0.5)
        with urllib.request.urlopen(server.url + "/debug/pprof/profile?seconds=1") as answer:
            assert answer.status == 200  # not 409 for 30 s


# 3. No handler freezes the event loop.


def test_a_large_symbol_request_gives_the_loop_its_turn_every_slice(
    not_tracing: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A megabyte of addresses takes seconds while tracemalloc traces: the handler hands the
    loop back every SLICE_SECONDS of its own work. Counted on a clock that advances a
    millisecond each time it is read, so the count does not depend on the machine's speed (the
    stall itself, in milliseconds, is measured by benchmarks/endpoint_stalls.py)."""
    body = b"+".join(b"0x400000" for _ in range(110_000))[: handlers.MAX_SYMBOL_REQUEST_BYTES]
    clock = iter(range(10**9))
    monkeypatch.setattr(handlers.time, "perf_counter", lambda: next(clock) / 1000)

    async def scenario() -> tuple[Client, int]:
        turns = 0
        finished = asyncio.Event()

        async def other_work() -> None:
            nonlocal turns
            while not finished.is_set():
                turns += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(other_work())
        client = await call(PprofApp(), "/symbol", Client(body=body), method="POST")
        finished.set()
        await other
        return client, turns

    client, turns = asyncio.run(scenario())
    assert client.status == 200 and client.content.startswith(b"num_symbols: 1")
    words = body.count(b"+") + 1
    # A turn at least every SLICE_SECONDS (5 ms): every 5 words on this clock, give or take.
    assert turns >= words * 0.001 / handlers.SLICE_SECONDS * 0.9


# 4. Go's integer parsing: more than 19 digits is not a number, and never a 500.


@pytest.mark.parametrize("name", ["seconds", "debug", "gc"])
def test_a_parameter_of_4301_digits_is_not_a_500(name: str) -> None:
    app = PprofApp(default_window_seconds=1, max_window_seconds=1)
    client = asyncio.run(call(app, f"/goroutine?{name}={'1' * 4301}", Client()))
    expected = 400 if name == "seconds" else 200  # debug and gc count as 0, as in Go
    assert client.status == expected
    if name == "seconds":
        assert client.content == b'invalid value for "seconds" - must be a positive integer'


def test_nineteen_digits_are_a_number_and_twenty_are_not() -> None:
    from asgi_pprof.asgi import go_int64

    assert go_int64("9" * 18) == int("9" * 18)
    assert go_int64("9223372036854775807") == 2**63 - 1
    assert go_int64("9223372036854775808") is None
    assert go_int64("1" * 20) is None and go_int64("0" * 20) is None


# 11. One heap build at a time; requests meanwhile share it.


def test_concurrent_heap_requests_share_one_build(forks: Builds, not_tracing: None) -> None:
    app = PprofApp()

    async def scenario() -> list[Client]:
        return list(await asyncio.gather(*(call(app, "/heap", Client()) for _ in range(5))))

    tracemalloc.start(1)
    try:
        clients = asyncio.run(scenario())
    finally:
        tracemalloc.stop()
    assert [c.status for c in clients] == [200] * 5
    assert len({c.content for c in clients}) == 1
    assert len(forks) == 1


def test_different_heap_requests_build_one_after_the_other(
    forks: Builds, not_tracing: None
) -> None:
    app = PprofApp()
    targets = ["/heap", "/heap?debug=1", "/heap?gc=1", "/heap?debug=1&gc=1"]

    async def scenario() -> list[Client]:
        return list(await asyncio.gather(*(call(app, t, Client()) for t in targets)))

    tracemalloc.start(1)
    try:
        clients = asyncio.run(scenario())
    finally:
        tracemalloc.stop()
    assert [c.status for c in clients] == [200] * 4
    assert len(forks) == 4 and forks.most == 1


def test_a_client_that_leaves_does_not_cancel_the_build_others_wait_for(
    forks: Builds, not_tracing: None
) -> None:
    app = PprofApp()

    async def scenario() -> tuple[Client, Client]:
        leaving = asyncio.create_task(call(app, "/heap", Client(leave_after=0.05)))
        staying = asyncio.create_task(call(app, "/heap", Client()))
        return await leaving, await staying

    tracemalloc.start(1)
    try:
        leaving, staying = asyncio.run(scenario())
    finally:
        tracemalloc.stop()
    assert leaving.sent == [] and staying.status == 200
    assert len(forks) == 1


# The symbol endpoint's body: refused when announced too large, given up on when too slow.


def test_a_body_announced_larger_than_the_limit_is_refused_at_once() -> None:
    headers = [(b"content-length", b"10000000000")]

    class NeverSends(Client):
        async def receive(self) -> Message:
            raise AssertionError("the body must not be read")

    client = asyncio.run(call(PprofApp(), "/symbol", NeverSends(), method="POST", headers=headers))
    assert client.status == 413


def test_a_body_that_never_arrives_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "BODY_TIMEOUT_SECONDS", 0.3)

    class Trickles(Client):
        async def receive(self) -> Message:
            await asyncio.sleep(0.1)
            return {"type": "http.request", "body": b"0", "more_body": True}

    started = time.monotonic()
    client = asyncio.run(call(PprofApp(), "/symbol", Trickles(), method="POST"))
    assert client.status == 408 and time.monotonic() - started < 2


# Cleaning up when the server cancels a request (uvicorn's graceful-shutdown timeout).


@pytest.mark.parametrize("target", ["/heap?seconds=30", "/profile?seconds=30"])
def test_a_request_cancelled_by_the_server_cleans_up(target: str, not_tracing: None) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(call(PprofApp(), target, Client()))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert not tracemalloc.is_tracing() and not cpu.in_use()


# Every endpoint, any query string and body: never a 5xx (how long each holds the loop is measured
# by benchmarks/endpoint_stalls.py: a stall in milliseconds depends on the machine).

ENDPOINTS = st.sampled_from(
    ["/", "/heap", "/goroutine", "/profile", "/cmdline", "/symbol", "/allocs", "/nothing"]
)
KEYS = st.sampled_from(["seconds", "debug", "gc", "x", ""])
VALUES = st.one_of(
    st.sampled_from(["0", "1", "2", "-1", "01", "1.5", "0x1", "１", "٣", "9" * 19, "9" * 4301]),
    st.text(max_size=6),
)
QUERIES = st.one_of(
    st.lists(st.tuples(KEYS, VALUES), max_size=3).map(
        lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8", "surrogatepass")
    ),
    st.binary(max_size=40),
)
BODIES = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from([b"0x400000", b"0x", b"1", b"", b"\xff", b"+"]), max_size=50).map(
        b"+".join
    ),
)
ANSWERS = {200, 301, 400, 404, 405, 408, 409, 413}


FUZZ_APP = PprofApp(default_window_seconds=1, max_window_seconds=1)  # survives every example


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT"]), path=ENDPOINTS, query=QUERIES,
       body=BODIES)  # fmt: skip
@example(method="POST", path="/symbol", query=b"", body=b"0x400000+" * 20)
@example(method="GET", path="/heap", query=b"seconds=1&gc=1&debug=1", body=b"")
def test_no_request_gets_a_5xx(method: str, path: str, query: bytes, body: bytes) -> None:
    assert not tracemalloc.is_tracing()
    request = scope(path, method)
    request["query_string"] = query
    client = Client(body=body)
    asyncio.run(FUZZ_APP(request, client.receive, client.send))
    assert client.status in ANSWERS, client.content[:300]
    assert not tracemalloc.is_tracing() and not cpu.in_use()


# 10. A heap build that fails answers why, at once; never a rebuild in the service.


def test_a_child_out_of_memory_is_a_503_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, not_tracing: None
) -> None:
    def out_of_memory(work: Callable[[bool], bytes], **kwargs: Any) -> bytes:
        raise forked.ChildOutOfMemory("heap profile not built: ... needs about 40 MiB ...")

    monkeypatch.setattr(forked, "run", out_of_memory)
    tracemalloc.start(1)
    try:
        client = asyncio.run(call(PprofApp(), "/heap", Client()))
    finally:
        tracemalloc.stop()
    assert client.status == 503
    assert client.content.startswith(b"heap profile not built")
    assert (b"x-go-pprof", b"1") in client.sent[0]["headers"]  # go tool pprof prints it


def test_a_build_that_everyone_left_is_cancelled_and_its_child_killed(
    monkeypatch: pytest.MonkeyPatch, not_tracing: None
) -> None:
    cancelled_events: list[Any] = []

    def slow(work: Callable[[bool], bytes], cancelled: Any = None, **kwargs: Any) -> bytes:
        cancelled_events.append(cancelled)
        assert cancelled is not None and cancelled.wait(10)  # as forked.run kills its child
        raise forked.ChildFailed("heap profile cancelled")

    monkeypatch.setattr(forked, "run", slow)

    async def scenario() -> float:
        started = time.monotonic()
        await asyncio.gather(*(call(PprofApp(), "/heap", Client(leave_after=0.2)) for _ in "ab"))
        return time.monotonic() - started

    tracemalloc.start(1)
    try:
        seconds = asyncio.run(scenario())
    finally:
        tracemalloc.stop()
    assert seconds < 5
    assert cancelled_events and all(event.is_set() for event in cancelled_events)
