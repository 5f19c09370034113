"""/debug/pprof/profile: CPU profiles sampled at 100 Hz of CPU time, read by the real go tool pprof.

The accuracy tests burn a known amount of CPU time (measured by the burning thread's own clock)
in a function with a known name, and count the samples charged to it: 10 ms of CPU per sample.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_pprof import PprofApp, cpu
from asgi_pprof.symbolize import function_of

from go_pprof import run_pprof
from pprof_decode import decode, invariant_violations
from server import Server, serving


def burn_in_main(cpu_seconds: float) -> None:
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def burn_in_thread(cpu_seconds: float) -> None:
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def samples_by_leaf(profile: cpu.CPUProfile) -> dict[tuple[str, str], int]:
    """Samples by (thread, function of the leaf frame)."""
    counts: dict[tuple[str, str], int] = {}
    for (thread, stack), number in profile.samples.items():
        key = (thread, function_of(*stack[0])[0] if stack else "")
        counts[key] = counts.get(key, 0) + number
    return counts


def samples_of(profile: cpu.CPUProfile, thread: str, function: str) -> int:
    return sum(
        number
        for (name, leaf), number in samples_by_leaf(profile).items()
        if name == thread and leaf.endswith("." + function)
    )


def profile_while(work: Callable[[], None], threads: list[threading.Thread]) -> cpu.CPUProfile:
    """Profile from just before `work` runs in the main thread until it and `threads` are done."""

    async def scenario() -> cpu.CPUProfile:
        profiler = cpu.CPUProfiler()
        profiler.start()
        try:
            for thread in threads:
                thread.start()
            work()
            while any(thread.is_alive() for thread in threads):
                await asyncio.sleep(0.01)
        finally:
            profile = profiler.stop()
        return profile

    return asyncio.run(scenario())


def test_instruction_offsets_become_the_lines_python_reports() -> None:
    """The handler records offsets, resolved to lines later: the same lines as `f_lineno`."""
    frame = sys._getframe()
    checked = 0
    while frame is not None:
        assert cpu._line_of(frame.f_code, frame.f_lasti) == frame.f_lineno
        frame = frame.f_back
        checked += 1
    assert checked > 5


def test_the_main_thread_is_charged_the_cpu_time_it_uses_where_it_uses_it() -> None:
    profile = profile_while(lambda: burn_in_main(1.0), [])
    # 1 s of CPU is 100 samples at 100 Hz; a few more for the loop around it.
    assert 95 <= samples_of(profile, "MainThread", "burn_in_main") <= 102
    assert sum(profile.samples.values()) <= 110


def test_each_thread_is_charged_its_own_cpu_time() -> None:
    burning = threading.Thread(target=burn_in_thread, args=(1.0,), name="burner")
    profile = profile_while(lambda: None, [burning])
    assert 95 <= samples_of(profile, "burner", "burn_in_thread") <= 102
    # The main thread only waited.
    assert sum(n for (thread, _), n in profile.samples.items() if thread == "MainThread") <= 10


def test_a_thread_asleep_in_c_is_never_charged() -> None:
    release = threading.Event()
    sleeping = threading.Thread(target=release.wait, name="sleeper")
    sleeping.start()
    try:
        profile = profile_while(lambda: burn_in_main(0.5), [])
    finally:
        release.set()
        sleeping.join()
    assert not [key for key in profile.samples if key[0] == "sleeper"]
    assert samples_of(profile, "MainThread", "burn_in_main") >= 45


def test_threads_started_during_a_profile_are_charged_too() -> None:
    async def scenario() -> tuple[cpu.CPUProfile, bool]:
        profiling = asyncio.create_task(cpu.profile_for(3))
        await asyncio.sleep(0.2)
        burning = threading.Thread(target=burn_in_thread, args=(0.3,), name="late burner")
        burning.start()
        profile = await profiling
        return profile, burning.is_alive()

    profile, still_burning = asyncio.run(scenario())
    assert not still_burning
    # Its last few milliseconds may be seen only after its Python code is over.
    leaves = {
        leaf: n for (thread, leaf), n in samples_by_leaf(profile).items() if thread == "late burner"
    }
    assert 27 <= sum(leaves.values()) <= 31
    assert set(leaves) <= {"test_cpu.burn_in_thread", "thread exited"}
    assert leaves.get("thread exited", 0) <= 2


def test_go_tool_pprof_reads_the_profile(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    burning = threading.Thread(target=burn_in_thread, args=(0.5,), name="burner")
    profile = profile_while(lambda: burn_in_main(0.5), [burning])
    encoded = cpu.encode(profile)
    assert invariant_violations(decode(encoded)) == []
    saved = tmp_path / "profile.pb.gz"
    saved.write_bytes(encoded)

    raw = run_pprof(go, "-raw", str(saved))
    assert "PeriodType: cpu nanoseconds" in raw
    assert "Period: 10000000" in raw
    assert re.search(r"samples/count cpu/nanoseconds", raw)

    rows = top_rows(run_pprof(go, "-top", str(saved)))
    leaves = {function.rsplit(".", 1)[-1]: flat_ms for flat_ms, _, function in rows}
    assert 450 <= leaves["burn_in_main"] <= 520
    assert 450 <= leaves["burn_in_thread"] <= 520

    tags = run_pprof(go, "-tags", str(saved))
    assert re.search(r"thread: Total", tags)
    burner_only = top_rows(run_pprof(go, "-top", "-tagfocus=thread=burner", str(saved)))
    flat = {function: flat for flat, _, function in burner_only if flat}
    burner = [function for function in flat if function.endswith(".burn_in_thread")]
    # Its last milliseconds may be seen only as the thread winds down (threading's own code) or
    # once its Python code is over.
    others = flat.keys() - {*burner, "thread exited"}
    assert all(function.startswith("threading.") for function in others), others
    assert len(burner) == 1 and flat[burner[0]] >= 450


def test_one_profile_at_a_time_and_free_again_after() -> None:
    async def scenario() -> None:
        first = asyncio.create_task(cpu.profile_for(0.5))
        await asyncio.sleep(0.05)
        assert cpu.in_use()
        with pytest.raises(cpu.ProfilingInUse, match="cpu profiling already in use"):
            await cpu.profile_for(0.1)
        await first
        assert not cpu.in_use()
        await cpu.profile_for(0.05)

    asyncio.run(scenario())
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


def test_a_cancelled_profile_stops_the_timer() -> None:
    async def scenario() -> None:
        profiling = asyncio.create_task(cpu.profile_for(30))
        await asyncio.sleep(0.05)
        assert signal.getitimer(signal.ITIMER_PROF) != (0.0, 0.0)
        profiling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await profiling

    asyncio.run(scenario())
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert not cpu.in_use()


def test_another_profilers_handler_is_given_back() -> None:
    def other_profilers_handler(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGPROF, other_profilers_handler)
    try:
        asyncio.run(cpu.profile_for(0.05))
        assert signal.getsignal(signal.SIGPROF) is other_profilers_handler
    finally:
        signal.signal(signal.SIGPROF, previous)


def test_a_late_sigprof_does_not_end_the_process() -> None:
    """SIGPROF's default action ends the process: after a profile, one arriving late must not."""
    script = (
        "import asyncio, os, signal\n"
        "from asgi_pprof import cpu\n"
        "asyncio.run(cpu.profile_for(0.05))\n"
        "os.kill(os.getpid(), signal.SIGPROF)\n"
        "print('alive')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout) == (0, "alive\n"), result.stderr


def test_outside_the_main_thread_profiling_is_unavailable() -> None:
    outcome: list[object] = []

    def serve_in_a_thread() -> None:
        async def scenario() -> None:
            try:
                await cpu.profile_for(0.05)
            except cpu.ProfilingUnavailable as error:
                outcome.append(error)
            outcome.append(await ask(PprofApp(), "/profile?seconds=1"))

        asyncio.run(scenario())

    thread = threading.Thread(target=serve_in_a_thread)
    thread.start()
    thread.join()
    error, answer = outcome
    assert "main thread" in str(error)
    assert isinstance(answer, httpx.Response)
    assert answer.status_code == 501
    assert answer.text.startswith("Could not enable CPU profiling: SIGPROF handlers can only")
    assert not cpu.in_use()


# ---- HTTP ----------------------------------------------------------------------------------------


def top_rows(report: str) -> list[tuple[float, float, str]]:
    """(flat, cum, function) of each `go tool pprof -top` row, in milliseconds for time units."""
    scale = {"": 1.0, "ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
    row = re.compile(r"^\s*([\d.]+)(\w*)\s+\S+%\s+\S+%\s+([\d.]+)(\w*)\s+\S+%\s+(.+)$")
    return [
        (float(m[1]) * scale[m[2]], float(m[3]) * scale[m[4]], m[5])
        for m in map(row.match, report.splitlines())
        if m
    ]


async def ask(app: PprofApp, target: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pprof") as client:
        return await client.get(target)


@pytest.mark.parametrize("seconds", ["abc", "-1", "0", "1.5", "301"])
def test_bad_seconds_are_a_400_as_for_heap(seconds: str) -> None:
    answer = asyncio.run(ask(PprofApp(), f"/profile?seconds={seconds}"))
    assert answer.status_code == 400
    assert answer.text.startswith('invalid value for "seconds"')
    assert not cpu.in_use()


def test_without_seconds_the_default_window_is_used() -> None:
    started = time.monotonic()
    answer = asyncio.run(ask(PprofApp(default_window_seconds=1), "/profile"))
    assert answer.status_code == 200
    assert 1 <= time.monotonic() - started < 5
    assert 1e9 <= decode(answer.content).duration_nanos < 2e9


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving("example_service:app", tmp_path_factory.mktemp("cpu-service")) as running:
        yield running


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            return answer.status, answer.headers.get("x-go-pprof", ""), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("x-go-pprof", ""), error.read()


class Load:
    """Requests to the service from a few threads, until stopped."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        while not self.stopped.is_set():
            with urllib.request.urlopen(self.url, timeout=10) as answer:
                answer.read()

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join()


def test_go_tool_pprof_profiles_the_service_over_http(
    service: Server, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    with Load(service.url + "/"):
        report = run_pprof(
            go, "-seconds", "2", "-top", "-nodecount=1000", service.url + "/debug/pprof/profile"
        )
    assert "Type: cpu" in report
    functions = [function for _, _, function in top_rows(report)]
    # The service's own handler does next to nothing: the time goes to what serves it.
    for package in ("uvicorn.", "starlette.", "asyncio."):
        assert any(function.startswith(package) for function in functions), package


def test_a_second_profile_meanwhile_gets_409_and_the_service_goes_on(
    service: Server, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    first: list[tuple[int, str, bytes]] = []
    profiling = threading.Thread(
        target=lambda: first.append(get(service.url + "/debug/pprof/profile?seconds=2"))
    )
    profiling.start()
    time.sleep(0.5)
    status, go_pprof_header, body = get(service.url + "/debug/pprof/profile?seconds=1")
    assert (status, go_pprof_header) == (409, "1")
    assert body == b"Could not enable CPU profiling: cpu profiling already in use"
    # go tool pprof shows the reason.
    result = subprocess.run(
        [go, "tool", "pprof", "-top", service.url + "/debug/pprof/profile?seconds=1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "409 Conflict - Could not enable CPU profiling: cpu profiling already in use" in (
        result.stderr
    )
    # The wait does not block the service.
    started = time.monotonic()
    assert get(service.url + "/")[0] == 200
    assert time.monotonic() - started < 1
    profiling.join()
    assert first[0][0] == 200
    assert invariant_violations(decode(first[0][2])) == []


QUERY_KEYS = st.sampled_from(["seconds", "debug", "hz", ""])
QUERY_VALUES = st.one_of(
    st.sampled_from(["1", "01", "0", "-1", "2", "abc", "", "1.0", "0x1", "１", "9" * 30]),
    st.text(max_size=5),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=3),
    st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=3),
)
def test_no_query_string_gets_a_server_error(
    first: list[tuple[str, str]], second: list[tuple[str, str]]
) -> None:
    """Two requests at once: a 200 or a 400 each, or a 409 for the one that overlaps."""
    app = PprofApp(default_window_seconds=1, max_window_seconds=1)  # examples stay short

    async def both() -> list[httpx.Response]:
        return await asyncio.gather(
            ask(app, f"/profile?{httpx.QueryParams(first)}"),
            ask(app, f"/profile?{httpx.QueryParams(second)}"),
        )

    answers = asyncio.run(both())
    assert [a.status_code for a in answers if a.status_code not in (200, 400, 409)] == []
    assert sum(a.status_code == 200 for a in answers) <= 1
    for answer in answers:
        if answer.status_code == 409:
            assert "cpu profiling already in use" in answer.text
        if answer.status_code == 200:
            assert invariant_violations(decode(answer.content)) == []
    assert not cpu.in_use()
