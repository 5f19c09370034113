"""The /debug/pprof/ HTTP surface: Go's answers to bad input, windows, gc, the index, headers.

In-process: a small Starlette service mounts `PprofApp()` at /debug/pprof, as app/main.py does,
and httpx talks to it through ASGITransport; the bare ASGI app is also called directly, with raw
query bytes no HTTP client would send. Windows are kept to a second or two.
"""

from __future__ import annotations

import asyncio
import gc
import re
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from asgi_pprof import PprofApp, start_tracing
from asgi_pprof.heap import HeapProfile

from pprof_decode import decode, invariant_violations, samples

POSITIVE_INTEGER = 'invalid value for "seconds" - must be a positive integer'
ALLOWED_STATUSES = {200, 400, 404, 405}


def service_with(pprof_app: PprofApp) -> Starlette:
    """A service like app/main.py: `/` answers OK, the profiler is mounted at /debug/pprof."""

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("OK\n")

    return Starlette(routes=[Route("/", ok), Mount("/debug/pprof", app=pprof_app)])


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://leaker")


def request(app: Any, method: str, url: str) -> httpx.Response:
    async def send() -> httpx.Response:
        async with client_for(app) as client:
            return await client.request(method, url)

    return asyncio.run(send())


async def call_asgi(app: Any, method: str, path: str, query: bytes) -> tuple[int, bytes]:
    """One request straight to the ASGI app, with any path and raw query bytes."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": quote(path).encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"leaker")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    assert [m["type"] for m in messages] == ["http.response.start", "http.response.body"]
    return messages[0]["status"], messages[1]["body"]


@pytest.fixture
def not_tracing() -> Iterator[None]:
    """Starts and ends with tracemalloc off, as in a service with PPROF_TRACEMALLOC=on-demand."""
    assert not tracemalloc.is_tracing(), "another test left tracemalloc on"
    yield
    tracemalloc.stop()


@pytest.fixture
def tracing(not_tracing: None) -> None:
    """tracemalloc on, as in PPROF_TRACEMALLOC=startup: `/heap` answers a snapshot at once."""
    start_tracing(1)  # one frame: cheap, and enough for what these tests read


@pytest.fixture
def captures(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When each heap window's starting point was fixed (the profile is built in a child)."""
    finished: list[float] = []
    real_window_start = PprofApp._window_start

    async def window_start(self: PprofApp, traced_before: bool) -> HeapProfile:
        start = await real_window_start(self, traced_before)
        finished.append(time.monotonic())
        return start

    monkeypatch.setattr(PprofApp, "_window_start", window_start)
    return finished


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def space_in(profile: Any, function: str) -> int:
    """Bytes in use by samples with `function` (a test function's name) on their stack."""
    return sum(
        s.values["inuse_space"]
        for s in samples(profile)
        if any(f.function.endswith(f".{function}") for f in s.frames)
    )


def keep_blocks(kept: list[bytearray]) -> None:
    for _ in range(50):
        kept.append(bytearray(10_000))


def allocate_x(kept: list[bytearray]) -> None:
    keep_blocks(kept)


def allocate_y(kept: list[bytearray]) -> None:
    keep_blocks(kept)


def allocate_z(kept: list[bytearray]) -> None:
    keep_blocks(kept)


def allocate_w(kept: list[bytearray]) -> None:
    keep_blocks(kept)


BLOCKS_BYTES = 50 * 10_000


# Bad input, answered as Go's net/http/pprof answers it.


@pytest.mark.parametrize(
    "seconds",
    [
        "abc",
        "-1",
        "0",
        "1.5",
        " 1",
        "1e3",
        "-0",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: a digit to Python, not to Go
        "\u00b2",  # SUPERSCRIPT TWO
        str(2**63),  # too big for Go's int64
        "9" * 40,
    ],
)
def test_a_bad_seconds_value_is_a_400_as_in_go(seconds: str) -> None:
    app = service_with(PprofApp())
    answer = request(app, "GET", f"/debug/pprof/heap?{urlencode({'seconds': seconds})}")
    assert (answer.status_code, answer.text.strip()) == (400, POSITIVE_INTEGER)
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.headers["x-go-pprof"] == "1"  # so that `go tool pprof` prints the message


@pytest.mark.parametrize(
    ("max_window_seconds", "seconds"), [(300, "301"), (300, str(2**63 - 1)), (2, "3")]
)
def test_seconds_above_the_cap_is_a_400_naming_the_cap(
    max_window_seconds: int, seconds: str
) -> None:
    app = service_with(PprofApp(max_window_seconds=max_window_seconds))
    started = time.monotonic()
    answer = request(app, "GET", f"/debug/pprof/heap?seconds={seconds}")
    assert answer.status_code == 400
    assert str(max_window_seconds) in answer.text
    assert "seconds" in answer.text
    assert time.monotonic() - started < 5  # refused at once, not after a window


@pytest.mark.parametrize("path", ["/debug/pprof/nope", "/debug/pprof/heap/more", "/debug/pprof/x/"])
def test_an_unknown_profile_is_a_404(path: str) -> None:
    answer = request(service_with(PprofApp()), "GET", path)
    assert (answer.status_code, answer.text.strip()) == (404, "Unknown profile")


@pytest.mark.parametrize("debug", ["abc", "", "\u0661", " 1", "1_0"])
@pytest.mark.usefixtures("tracing")
def test_a_debug_value_that_is_not_a_go_integer_answers_the_binary_profile(debug: str) -> None:
    answer = request(service_with(PprofApp()), "GET", f"/debug/pprof/heap?debug={quote(debug)}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/octet-stream"
    assert invariant_violations(decode(answer.content)) == []


@pytest.mark.usefixtures("tracing")
def test_a_repeated_parameter_counts_its_first_value_as_in_go() -> None:
    # Go's r.FormValue is the first value.
    answer = request(service_with(PprofApp()), "GET", "/debug/pprof/heap?debug=1&debug=0")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/plain; charset=utf-8", "the last value won"
    assert answer.text.startswith("heap profile: ")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/debug/pprof/", "/debug/pprof/heap"])
def test_methods_other_than_get_and_head_are_a_405(method: str, path: str) -> None:
    answer = request(service_with(PprofApp()), method, path)
    assert answer.status_code == 405
    assert "GET" in answer.headers["allow"]


@pytest.mark.usefixtures("tracing")
def test_head_answers_the_headers_without_a_body() -> None:
    app = service_with(PprofApp())
    index = request(app, "HEAD", "/debug/pprof/")
    assert (index.status_code, index.content) == (200, b"")
    assert index.headers["content-type"].startswith("text/html")
    profile = request(app, "HEAD", "/debug/pprof/heap")
    assert (profile.status_code, profile.content) == (200, b"")
    assert profile.headers["content-type"] == "application/octet-stream"


@pytest.mark.usefixtures("tracing")
def test_the_binary_profile_has_the_headers_go_sends() -> None:
    answer = request(service_with(PprofApp()), "GET", "/debug/pprof/heap")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/octet-stream"
    assert answer.headers["content-disposition"] == 'attachment; filename="heap"'
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["content-length"] == str(len(answer.content))


def test_the_index_lists_heap_and_nothing_that_does_not_exist(not_tracing: None) -> None:
    pprof_app = PprofApp()
    answer = request(service_with(pprof_app), "GET", "/debug/pprof/")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    links = re.findall(r"href='([^'?]+)\?debug=1'", answer.text)
    assert "heap" in links
    assert set(links) <= set(pprof_app.handlers)
    description = re.search(r"<div class=profile-name>heap: </div>(.*)</li>", answer.text)
    assert description and "gc" in description[1] and "seconds" in description[1]


# Arbitrary input never breaks the service.

METHODS = st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
PATHS = st.one_of(
    st.sampled_from(["/", "/heap", "/heap/", "/nope", "//heap", "/HEAP"]),
    st.text(max_size=20).map(lambda text: "/" + text),
)
KEYS = st.one_of(st.sampled_from(["seconds", "debug", "gc"]), st.text(max_size=10))
VALUES = st.one_of(
    st.sampled_from(["", "0", "1", "2", "3", "-1", "abc", "1.5", "\u0661", "+1", "1_0", " 2"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.text(max_size=20),
)
QUERIES = st.lists(st.tuples(KEYS, VALUES), max_size=5).map(urlencode)
FAST_WINDOWS = {"default_window_seconds": 1, "max_window_seconds": 2}
PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@contextmanager
def traced() -> Iterator[None]:
    """Tracing for one example only: hypothesis' own first-run work (it tabulates Unicode) would
    take minutes under tracemalloc, and `/heap` snapshots stay small."""
    start_tracing(1)
    try:
        yield
    finally:
        tracemalloc.stop()


RAW_QUERIES = st.one_of(
    QUERIES.map(str.encode),  # percent-encoded
    st.text(max_size=40).map(str.encode),  # as typed, UTF-8
    st.binary(max_size=60),
)
ONE_APP = PprofApp(**FAST_WINDOWS)  # one app for every example: it must survive all of them


@PROPERTY_SETTINGS
@given(method=METHODS, path=PATHS, query=RAW_QUERIES)
@example(method="GET", path="/heap", query=b"seconds=1&debug=1&gc=1")  # a real window, once
@pytest.mark.usefixtures("not_tracing")
def test_any_request_to_the_bare_app_gets_a_4xx_or_a_profile(
    method: str, path: str, query: bytes
) -> None:
    with traced():
        status, body = asyncio.run(call_asgi(ONE_APP, method, path, query))
        index_status, _ = asyncio.run(call_asgi(ONE_APP, "GET", "/", b""))
    assert status in ALLOWED_STATUSES, body[:500]
    assert index_status == 200


@PROPERTY_SETTINGS
@given(method=METHODS, path=PATHS, query=QUERIES)
@pytest.mark.usefixtures("not_tracing")
def test_any_request_through_a_mounted_app_gets_a_4xx_or_a_profile(
    method: str, path: str, query: str
) -> None:
    app = service_with(PprofApp(**FAST_WINDOWS))
    url = "/debug/pprof" + quote(path) + (f"?{query}" if query else "")
    with traced():
        answer = request(app, method, url)
    assert answer.status_code in ALLOWED_STATUSES, answer.text[:500]


@pytest.mark.usefixtures("not_tracing")
def test_the_app_keeps_answering_after_arbitrary_requests() -> None:
    pprof_app = PprofApp(**FAST_WINDOWS)

    async def scenario() -> tuple[list[int], httpx.Response]:
        statuses = []
        for query in [b"seconds=abc", b"seconds=%ff%fe", b"seconds=9&gc=\xff", b"seconds=\x00"]:
            statuses.append((await call_asgi(pprof_app, "GET", "/heap", query))[0])
        async with client_for(service_with(pprof_app)) as client:
            return statuses, await client.get("/debug/pprof/heap?seconds=1")

    statuses, window = asyncio.run(scenario())
    assert statuses == [400, 400, 400, 400]
    assert window.status_code == 200
    assert decode(window.content).duration_nanos > 0
    # No request left a window open: the on-demand window turned tracing off when it closed.
    assert not tracemalloc.is_tracing()


# Windows.


@pytest.mark.usefixtures("not_tracing")
def test_overlapping_windows_each_get_their_own_growth(captures: list[float]) -> None:
    app = service_with(PprofApp())

    async def scenario() -> tuple[Any, Any, float, bool]:
        x: list[bytearray] = []
        y: list[bytearray] = []
        w: list[bytearray] = []
        async with client_for(app) as client:
            window_a = asyncio.create_task(client.get("/debug/pprof/heap?seconds=2"))
            await until(lambda: len(captures) == 1)  # A has taken its starting capture
            allocate_x(x)
            window_b = asyncio.create_task(client.get("/debug/pprof/heap?seconds=1"))
            await until(lambda: len(captures) == 2)
            allocate_y(y)
            started = time.monotonic()
            ok = await client.get("/")  # the event loop is free while windows wait
            ok_seconds = time.monotonic() - started
            assert ok.text == "OK\n" and not window_b.done()
            b = await window_b
            still_tracing = tracemalloc.is_tracing()  # A is still open
            allocate_w(w)
            a = await window_a
        assert a.status_code == b.status_code == 200
        return decode(a.content), decode(b.content), ok_seconds, still_tracing

    a, b, ok_seconds, still_tracing_after_b = asyncio.run(scenario())
    assert ok_seconds < 0.5
    assert still_tracing_after_b
    assert invariant_violations(a) == [] and invariant_violations(b) == []
    assert space_in(b, "allocate_y") >= BLOCKS_BYTES
    assert space_in(b, "allocate_x") == 0  # allocated before B opened
    for function in ("allocate_x", "allocate_y", "allocate_w"):
        assert space_in(a, function) >= BLOCKS_BYTES, function
    assert 1e9 <= b.duration_nanos < a.duration_nanos
    # On demand, tracing costs nothing once the last window has closed.
    assert not tracemalloc.is_tracing()


@pytest.mark.usefixtures("not_tracing")
def test_tracing_started_by_the_service_stays_on_after_windows(captures: list[float]) -> None:
    app = service_with(PprofApp())

    async def scenario() -> None:
        async with client_for(app) as client:
            # Started before a window, as PPROF_TRACEMALLOC=startup does.
            start_tracing(4)
            assert (await client.get("/debug/pprof/heap?seconds=1")).status_code == 200
            assert tracemalloc.is_tracing()
            tracemalloc.stop()
            # Started while a window (which turned tracing on) is open.
            window = asyncio.create_task(client.get("/debug/pprof/heap?seconds=1"))
            await until(lambda: len(captures) == 2)
            start_tracing(4)
            assert (await window).status_code == 200
            assert tracemalloc.is_tracing()

    asyncio.run(scenario())


@pytest.mark.usefixtures("not_tracing")
def test_heap_without_seconds_waits_for_the_default_window_when_not_tracing(
    captures: list[float],
) -> None:
    app = service_with(PprofApp(default_window_seconds=1))

    async def scenario() -> httpx.Response:
        z: list[bytearray] = []
        async with client_for(app) as client:
            answer = asyncio.create_task(client.get("/debug/pprof/heap"))
            await until(lambda: len(captures) == 1)
            allocate_z(z)
            return await answer

    answer = asyncio.run(scenario())
    assert answer.status_code == 200
    profile = decode(answer.content)
    assert 1e9 <= profile.duration_nanos < 5e9
    assert space_in(profile, "allocate_z") >= BLOCKS_BYTES
    assert not tracemalloc.is_tracing()


def make_cyclic_garbage() -> None:
    for _ in range(1000):
        cycle: list[Any] = []
        cycle.append(cycle)


@pytest.fixture
def gc_disabled() -> Iterator[None]:
    """Only an explicit collection frees cycles, so the test sees whether one ran."""
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


@pytest.mark.usefixtures("not_tracing", "gc_disabled")
@pytest.mark.parametrize("collect", [False, True])
def test_gc_1_collects_garbage_before_the_profile(captures: list[float], collect: bool) -> None:
    app = service_with(PprofApp())
    url = "/debug/pprof/heap?seconds=1" + ("&gc=1" if collect else "")

    async def scenario() -> httpx.Response:
        async with client_for(app) as client:
            answer = asyncio.create_task(client.get(url))
            await until(lambda: len(captures) == 1)
            make_cyclic_garbage()
            return await answer

    profile = decode(asyncio.run(scenario()).content)
    garbage = space_in(profile, "make_cyclic_garbage")
    if collect:
        assert garbage == 0
    else:
        assert garbage >= 1000 * 56  # sizeof an empty list: the cycles are still there
