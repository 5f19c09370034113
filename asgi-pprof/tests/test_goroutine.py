"""/debug/pprof/goroutine: every thread and every pending asyncio task, as Go's goroutine profile.

The end-to-end tests run a test-only app (defined below, never part of the shipped service) under
uvicorn in a subprocess: PprofApp plus a route that leaks tasks, and a second event loop in a
thread of its own, so that "tasks of every loop" is checked where it matters. The real
`go tool pprof` reads every binary answer.
"""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from asgi_pprof import PprofApp, goroutine
from asgi_pprof.symbolize import function_of

from go_pprof import run_pprof
from pprof_decode import decode, invariant_violations, samples
from server import serving

LEAKED_TASKS_PER_REQUEST = 200
OTHER_LOOP_TASKS = 3

# ---- The test-only app -------------------------------------------------------------------------

_leaked: set[asyncio.Task] = set()  # the leak: references that keep tasks nobody awaits


async def leaked_worker() -> None:
    await asyncio.sleep(3600)


async def other_loop_worker() -> None:
    await asyncio.sleep(3600)


async def leak(request: Request) -> PlainTextResponse:
    for _ in range(LEAKED_TASKS_PER_REQUEST):
        _leaked.add(asyncio.create_task(leaked_worker()))
    return PlainTextResponse(f"{len(_leaked)} tasks leaked\n")


def run_other_loop(ready: threading.Event) -> None:
    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(other_loop_worker()) for _ in range(OTHER_LOOP_TASKS)]
    loop.call_soon(ready.set)
    try:
        loop.run_forever()
    finally:
        del tasks


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    ready = threading.Event()
    threading.Thread(target=run_other_loop, args=(ready,), name="other-loop", daemon=True).start()
    ready.wait(10)
    yield


leaky_tasks_app = Starlette(
    routes=[Route("/leak", leak), Mount("/debug/pprof", app=PprofApp())], lifespan=lifespan
)


@pytest.fixture(scope="module")
def leaky_app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("leaky-tasks-app")
    with serving(f"{Path(__file__).stem}:leaky_tasks_app", tmp_path) as server:
        yield server.url


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def top_rows(report: str) -> list[tuple[int, int, str]]:
    """(flat, cum, function) for each row of `go tool pprof -top`."""
    row = re.compile(r"^\s*(-?\d+)\s+\S+%\s+\S+%\s+(-?\d+)\s+\S+%\s+(.+)$")
    return [
        (int(match[1]), int(match[2]), match[3])
        for match in map(row.match, report.splitlines())
        if match
    ]


# ---- In-process captures -----------------------------------------------------------------------


def blocked_in_thread(release: threading.Event) -> None:
    release.wait()


async def waiting_in_other_loop() -> None:
    await asyncio.sleep(3600)


async def numbers() -> AsyncIterator[int]:
    yield 1
    await asyncio.sleep(3600)
    yield 2


async def reading_an_async_generator() -> None:
    async for _ in numbers():
        pass


@pytest.fixture
def other_threads() -> Iterator[None]:
    """A thread blocked in `blocked_in_thread`, and an event loop in another thread with two
    tasks waiting in `waiting_in_other_loop`."""
    release = threading.Event()
    blocked = threading.Thread(target=blocked_in_thread, args=(release,), name="blocked")
    blocked.start()
    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(waiting_in_other_loop()) for _ in range(2)]
    ready = threading.Event()
    loop.call_soon(ready.set)

    def run_loop() -> None:
        loop.run_forever()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    looping = threading.Thread(target=run_loop, name="other loop")
    looping.start()
    ready.wait(10)
    yield
    release.set()
    for task in tasks:
        loop.call_soon_threadsafe(task.cancel)
    loop.call_soon_threadsafe(loop.stop)
    blocked.join(10)
    looping.join(10)


def names(stack: goroutine.Stack) -> list[str]:
    return [function_of(*frame)[0] for frame in stack]


def test_capture_has_every_thread_and_the_tasks_of_every_loop(other_threads: None) -> None:
    async def scenario() -> list[goroutine.Goroutine]:
        tasks = [asyncio.create_task(reading_an_async_generator()) for _ in range(3)]
        await asyncio.sleep(0.05)
        captured = goroutine.capture()
        for task in tasks:
            task.cancel()
        return captured

    captured = asyncio.run(scenario())

    threads = [g for g in captured if g.kind == "thread"]
    assert [g.title for g in threads] == [
        f'{thread.ident} "{thread.name}"'
        for thread in sorted(
            threading.enumerate(),
            key=lambda thread: (thread is not threading.main_thread(), thread.ident),
        )
    ]
    blocked = next(g for g in threads if g.title.endswith('"blocked"'))
    assert names(blocked.stack)[:3] == [
        "threading.Condition.wait",
        "threading.Event.wait",
        "test_goroutine.blocked_in_thread",
    ]
    tasks = [g for g in captured if g.kind == "task"]
    # Leaf first: the coroutine the task is suspended in, then the ones awaiting it.
    other_loop = [
        g for g in tasks if names(g.stack)[1:] == ["test_goroutine.waiting_in_other_loop"]
    ]
    assert len(other_loop) == 2
    assert all(
        names(g.stack)[0] == "asyncio.tasks.sleep" and g.state == "pending" for g in other_loop
    )
    readers = [g for g in tasks if "test_goroutine.reading_an_async_generator" in names(g.stack)]
    assert len(readers) == 3
    assert all(
        names(g.stack) == [
            "asyncio.tasks.sleep",
            "test_goroutine.numbers",
            "test_goroutine.reading_an_async_generator",
        ]
        for g in readers
    )  # fmt: skip
    # The task that took the capture is running: its stack is the top of the main thread's.
    (running,) = [g for g in tasks if g.state == "running"]
    main_stack = threads[0].stack
    assert running.stack == main_stack[: len(running.stack)]
    assert names(running.stack)[-1].endswith(".<locals>.scenario")


async def waiting_on_a_runners_loop() -> None:
    await asyncio.sleep(3600)


def test_tasks_of_a_loop_that_only_an_asyncio_runner_holds() -> None:
    """A loop that no Python frame runs (uvloop's run from C, or not running yet) whose
    `asyncio.Runner` (asyncio.run, uvicorn) is a local of a thread: on 3.14, where asyncio keeps
    its tasks per thread, the loop is found through the runner."""
    release, ready = threading.Event(), threading.Event()

    def hold_a_runner() -> None:
        with asyncio.Runner() as runner:
            task = runner.get_loop().create_task(waiting_on_a_runners_loop())
            runner.run(asyncio.sleep(0))  # one turn of the loop: the task waits in its sleep
            ready.set()  # the loop stands still, held by the runner only
            release.wait()
            task.cancel()

    holder = threading.Thread(target=hold_a_runner, name="runner holder")
    holder.start()
    try:
        assert ready.wait(10)
        tasks = [g for g in goroutine.capture() if g.kind == "task"]
        assert [(g.state, names(g.stack)) for g in tasks] == [
            ("pending", ["asyncio.tasks.sleep", "test_goroutine.waiting_on_a_runners_loop"])
        ]
        assert goroutine.count() == len(threading.enumerate()) + 1
    finally:
        release.set()
        holder.join(10)


def test_tasks_of_loops_without_a_running_loop_in_this_thread(other_threads: None) -> None:
    """Called outside any event loop, the other loop's tasks are still found."""
    tasks = [g for g in goroutine.capture() if g.kind == "task"]
    assert len(tasks) == 2
    assert goroutine.count() == len(threading.enumerate()) + 2


# ---- HTTP, in process (the handlers as any ASGI server calls them) -----------------------------


async def ask(app: PprofApp, target: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pprof") as client:
        return await client.get(target)


def test_debug_1_is_gos_legacy_text_with_counts_that_add_up(other_threads: None) -> None:
    answer = asyncio.run(ask(PprofApp(), "/goroutine?debug=1"))
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    header, *lines = answer.text.splitlines()
    total = int(re.fullmatch(r"goroutine profile: total (\d+)", header)[1])
    counts = [
        int(m[1]) for m in (re.fullmatch(r"(\d+) @( 0x[0-9a-f]+)+", line) for line in lines) if m
    ]
    assert sum(counts) == total
    # Threads, the other loop's two tasks, this request's task and the one that watches for the
    # client leaving.
    assert total == len(threading.enumerate()) + 4
    assert counts == sorted(counts, reverse=True)
    frame_line = re.compile(r"#\t0x[0-9a-f]+\t[^\t]+\t.+:\d+")
    assert all(frame_line.fullmatch(line) for line in lines if line.startswith("#"))
    assert "test_goroutine.waiting_in_other_loop" in answer.text


def test_debug_2_dumps_every_thread_and_task_in_full(other_threads: None) -> None:
    answer = asyncio.run(ask(PprofApp(), "/goroutine?debug=2"))
    assert answer.status_code == 200
    blocks = answer.text.split("\n\n")
    headers = [block.splitlines()[0] for block in blocks if block]
    for thread in threading.enumerate():
        assert f'thread {thread.ident} "{thread.name}" [running]:' in headers
    assert sum(re.fullmatch(r"task Task-\d+ \[pending\]:", h) is not None for h in headers) == 2
    for block in blocks:
        _, *frames = block.splitlines()
        assert len(frames) % 2 == 0
        for function_line, file_line in zip(frames[::2], frames[1::2], strict=True):
            assert re.fullmatch(r"[^\t]+\(\.\.\.\)", function_line)
            assert re.fullmatch(r"\t.+:\d+", file_line)
    blocked = next(b for b in blocks if '"blocked" [running]:' in b)
    assert "test_goroutine.blocked_in_thread(...)\n\t" + __file__ in blocked


def test_seconds_gives_the_growth_over_the_window(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")

    async def scenario() -> httpx.Response:
        profile = asyncio.create_task(ask(PprofApp(), "/goroutine?seconds=1"))
        await asyncio.sleep(0.3)
        started = [asyncio.create_task(leaked_worker()) for _ in range(7)]
        answer = await profile
        for task in started:
            task.cancel()
        return answer

    answer = asyncio.run(scenario())
    assert answer.status_code == 200
    assert answer.headers["content-disposition"] == 'attachment; filename="goroutine-delta"'
    profile = decode(answer.content)
    assert invariant_violations(profile) == []
    assert profile.duration_nanos >= 1e9
    growth = {
        s.frames[1].function: s.values["goroutine"] for s in samples(profile) if len(s.frames) > 1
    }
    assert growth.get("test_goroutine.leaked_worker") == 7
    saved = tmp_path / "goroutine-delta.pb.gz"
    saved.write_bytes(answer.content)
    leaked = [
        row
        for row in top_rows(run_pprof(go, "-top", "-cum", str(saved)))
        if row[2].endswith(".leaked_worker")
    ]
    assert leaked == [(0, 7, "test_goroutine.leaked_worker")]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/goroutine?seconds=abc", 'invalid value for "seconds" - must be a positive integer'),
        ("/goroutine?seconds=-1", 'invalid value for "seconds" - must be a positive integer'),
        ("/goroutine?seconds=0", 'invalid value for "seconds" - must be a positive integer'),
        ("/goroutine?seconds=1&debug=1", "seconds and debug params are incompatible"),
    ],
)
def test_bad_seconds_get_gos_answers(target: str, message: str) -> None:
    answer = asyncio.run(ask(PprofApp(), target))
    assert (answer.status_code, answer.text.strip()) == (400, message)
    assert answer.headers["x-go-pprof"] == "1"


def test_a_debug_that_is_not_a_number_counts_as_0() -> None:
    answer = asyncio.run(ask(PprofApp(), "/goroutine?debug=abc"))
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/octet-stream"
    assert invariant_violations(decode(answer.content)) == []


def test_the_index_lists_what_exists_like_go() -> None:
    answer = asyncio.run(ask(PprofApp(), "/"))
    rows = re.findall(
        r"<tr><td>([^<]*)</td><td><a href='(\w+)\?debug=1'>(\w+)</a></td></tr>", answer.text
    )
    assert [name for _, _, name in rows] == ["cmdline", "goroutine", "heap", "profile"]
    assert all(href == name for _, href, name in rows)
    assert '<a href="goroutine?debug=2">full goroutine stack dump</a>' in answer.text
    for name in ("cmdline", "goroutine", "heap", "profile"):
        assert f"<li><div class=profile-name>{name}: </div>" in answer.text
    # No event loop but the request's: the threads, and the request's own task.
    assert dict((name, count) for count, _, name in rows)["goroutine"] == str(
        len(threading.enumerate()) + 1
    )


QUERY_KEYS = st.sampled_from(["debug", "seconds", "gc", "other", ""])
QUERY_VALUES = st.one_of(
    st.sampled_from(["0", "1", "2", "3", "-1", "abc", "", "1.5", "0x1", " 1", "１", "9" * 30]),
    st.text(max_size=6),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=4))
def test_no_query_string_gets_a_server_error(parameters: list[tuple[str, str]]) -> None:
    query = httpx.QueryParams(parameters)
    app = PprofApp(max_window_seconds=1)  # a valid `seconds` is 1: examples stay quick
    answer = asyncio.run(ask(app, f"/goroutine?{query}"))
    assert answer.status_code in (200, 400), answer.text
    if answer.status_code == 400:
        assert answer.headers["x-go-pprof"] == "1"


# ---- End to end: a leak of tasks, read by the real `go tool pprof` -----------------------------


def test_leaked_tasks_top_the_goroutine_profile_in_go_tool_pprof(
    leaky_app_url: str, tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    assert get(leaky_app_url + "/leak")[0] == 200

    status, body = get(leaky_app_url + "/debug/pprof/goroutine")
    assert status == 200
    saved = tmp_path / "goroutine.pb.gz"
    saved.write_bytes(body)
    assert invariant_violations(decode(body)) == []
    raw = run_pprof(go, "-raw", str(saved))
    assert "PeriodType: goroutine count" in raw
    assert "goroutine/count" in raw

    # Where the tasks wait is asyncio's sleep, as Go's parked goroutines show runtime.gopark...
    flat = top_rows(run_pprof(go, "-top", leaky_app_url + "/debug/pprof/goroutine"))
    assert flat[0][2] == "asyncio.tasks.sleep" and flat[0][0] >= LEAKED_TASKS_PER_REQUEST
    # ...and whose they are comes first once asyncio's own frames are hidden.
    hidden = run_pprof(go, "-top", "-hide=^asyncio", leaky_app_url + "/debug/pprof/goroutine")
    first_flat, _, first_function = top_rows(hidden)[0]
    assert first_function.endswith(".leaked_worker")
    assert first_flat >= LEAKED_TASKS_PER_REQUEST
    # With -cum, it is the first of the service's own functions.
    cumulative = top_rows(run_pprof(go, "-top", "-cum", str(saved)))
    first_own = next(row for row in cumulative if not row[2].startswith("asyncio."))
    assert first_own[2].endswith(".leaked_worker")
    assert first_own[1] >= LEAKED_TASKS_PER_REQUEST


def test_tasks_of_another_event_loop_are_in_the_profile(
    leaky_app_url: str, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    rows = top_rows(run_pprof(go, "-top", "-cum", leaky_app_url + "/debug/pprof/goroutine"))
    other = [cum for _, cum, function in rows if function.endswith(".other_loop_worker")]
    assert other == [OTHER_LOOP_TASKS]


def test_the_index_count_follows_the_leak(leaky_app_url: str) -> None:
    def goroutine_count() -> int:
        page = get(leaky_app_url + "/debug/pprof/")[1].decode()
        return int(re.search(r"<tr><td>(\d+)</td><td><a href='goroutine\?debug=1'>", page)[1])

    before = goroutine_count()
    assert get(leaky_app_url + "/leak")[0] == 200
    assert goroutine_count() == before + LEAKED_TASKS_PER_REQUEST


def test_debug_2_shows_each_leaked_task(leaky_app_url: str) -> None:
    assert get(leaky_app_url + "/leak")[0] == 200
    status, body = get(leaky_app_url + "/debug/pprof/goroutine?debug=2")
    assert status == 200
    blocks = body.decode().split("\n\n")
    leaked = [
        b
        for b in blocks
        if re.match(r"task Task-\d+ \[pending\]:\nasyncio\.tasks\.sleep\(\.\.\.\)\n\t.+\n", b)
        and re.search(r"\n\S+\.leaked_worker\(\.\.\.\)\n", b)
    ]
    assert len(leaked) >= LEAKED_TASKS_PER_REQUEST
    assert any(b.startswith("thread ") and '"other-loop" [running]:' in b for b in blocks)
