"""The workshop, run for real: `docker compose up` as a user types it, and what it promises.

The tests run in file order against one stack (project `leaker-stack-test`): leaky mode under the
client's load, the same service switched to fixed mode, a restart, the out-of-memory restart at a
low limit, and `docker compose down`. They need a Docker engine (DOCKER_HOST) and Compose; without
them they are skipped with the reason, except under CI=true, where .ci/run starts an engine, and a
missing one is a failure. The images come from a registry where one answers, else from the
stand-ins .ci/stand-ins/build makes (see .ci/run).

The figures they measure (scrape success, health, RSS growth, time to the OOM restart) are printed
at the end of the run, whether the tests pass or not.
"""

from __future__ import annotations

import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.go_pprof import run_pprof
from tests.stack import (
    PROJECT,
    ROOT,
    EngineUnavailable,
    Stack,
    choose_ports,
    compose_command,
    docker,
    events,
    get,
    listeners,
    raw_samples,
    slope_per_minute,
    zipkin_span_names,
    zipkin_spans,
)
from tests.zipkin_receiver import span_list_errors, without_nulls

WARM_UP_SECONDS = 20  # after the service is healthy: imports done, caches filled
WINDOW_SECONDS = 60  # each mode is measured over this long under the client's load
# The workshop's target: 99% of scrapes succeed under load. The sampling profiler is what holds it
# with room to spare. With tracemalloc tracing every allocation, the service answers about 30
# requests/s here and a scrape waits behind up to two of them: one run on a quiet machine scraped
# 100% in both modes, runs beside other jobs on the same two cores 96.8% to 98.9%. So with
# tracemalloc this checks the 95% it holds there, below the target (see the README).
MIN_SCRAPE_SUCCESS = {"sampling": 0.99, "tracemalloc": 0.95}
LEAKY_MIN_GROWTH_MIB_PER_MINUTE = 3.0
# Flat next to the leak: at a thousand requests a second the fixed service's allocator still
# settles for a minute or two (0.4 to 2.5 MiB a minute measured, 8 to 30 B a request), where the
# leak costs about 1,100 B a request. Per request, because the client's rate moves run to run.
FIXED_MAX_SHARE_OF_LEAK = 0.1
OOM_LIMIT = "80m"  # low enough for the kill within minutes, above the service's startup memory
# The heap profile is taken "just before" the kill: when the container's memory cgroup has this
# little left. A tracemalloc profile's child needs at least 13 MiB (asgi_pprof/forked.py), and at
# the leak's few MiB a minute the service itself reaches the limit minutes later.
OOM_PROFILE_HEADROOM = 16 * 2**20
OOM_DEADLINE_SECONDS = 600
GRACE_SECONDS = 10  # Docker's default between SIGTERM and SIGKILL
SIGKILL_EXIT = 137
MARKED_REQUESTS = 20
PROXY_METER_PREFIX = "opentelemetry.metrics._internal._ProxyMeter"
PER_REQUEST_WRAPPER = "app.main.OpenTelemetryPerRequest.__call__"
# The handlers answer asgi_pprof.forked.ChildOutOfMemory with a 503 and its message.
CHILD_OUT_OF_MEMORY_STATUS = 503
CHILD_OUT_OF_MEMORY_TEXT = "heap profile not built"


def heap_profiler() -> str:
    """The stack's heap profiler: the compose file's PPROF_HEAP_PROFILER default, if it has one."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    value = str(services["leaker"]["environment"].get("PPROF_HEAP_PROFILER", "tracemalloc"))
    match = re.fullmatch(r"\$\{PPROF_HEAP_PROFILER:-(\w+)\}", value)
    return match[1] if match else value


@dataclass
class Figures:
    """What the run measured, printed at the end (see `report`)."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)


FIGURES = Figures()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    try:
        compose = compose_command()
    except EngineUnavailable as error:
        reason = f"the stack test needs a Docker engine and Compose: {error}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so this is a failure (.ci/run starts one)")
        pytest.skip(reason)
    Stack(compose).run("down", "--remove-orphans")  # what an interrupted run may have left
    ports, taken = choose_ports()
    stack = Stack(compose, ports)
    if taken:  # a user moves them the same way (see the compose file's head)
        FIGURES.add(
            f"default ports {taken} taken on this machine ({listeners(taken) or 'ss not found'}): "
            f"published on {ports}"
        )
    started = time.monotonic()
    stack.run("up", "--detach", "--build")
    stack.wait_healthy("leaker")
    FIGURES.add(f"compose up --build to healthy: {time.monotonic() - started:.0f} s")
    try:
        yield stack
    finally:
        stack.run("down", "--remove-orphans", check=False)


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    FIGURES.add(f"the stack test took {time.monotonic() - started:.0f} s")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if FIGURES.lines and capture is not None:
        with capture.global_and_fixture_disabled():  # past pytest's capture, into the CI log
            print("\n== the workshop stack, measured\n" + "\n".join(FIGURES.lines), flush=True)


def test_the_service_answers_on_its_published_port(stack: Stack) -> None:
    assert get(stack.url("leaker")) == b"OK\n"


def test_every_port_is_published_on_loopback_only(stack: Stack) -> None:
    for service, port in stack.ports.items():
        bindings = stack.inspect(service)["NetworkSettings"]["Ports"]
        published = [b for bs in bindings.values() if bs for b in bs]
        assert [(b["HostIp"], b["HostPort"]) for b in published] == [("127.0.0.1", str(port))]


def test_leaker_and_client_run_one_image(stack: Stack) -> None:
    assert stack.inspect("leaker")["Image"] == stack.inspect("client")["Image"]
    config = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "build" in config["leaker"] and "build" not in config["client"]


def test_spans_reach_zipkin_and_follow_its_schema(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    while not (spans := zipkin_spans(stack.url("zipkin", ""), "leaker", 50)):
        assert time.monotonic() < deadline, "no span of service leaker in Zipkin after 60 s"
        time.sleep(1)
    assert span_list_errors([without_nulls(span) for span in spans]) == []
    assert any(span.get("kind") == "SERVER" for span in spans)
    # The client's requests, and Prometheus's scrapes and the health checks: all traced. (The
    # newest traces are the client's: hundreds a second against one scrape.)
    assert zipkin_span_names(stack.url("zipkin", ""), "leaker") >= {"get /", "get /metrics"}
    assert "export failing" not in stack.logs("leaker")


@dataclass
class Window:
    """One mode under load: Prometheus's samples and the health states seen meanwhile."""

    mode: str
    scrapes: list[tuple[float, float]]  # `up`: 1 for a successful scrape, 0 for a failed one
    resident: list[tuple[float, float]]  # process_resident_memory_bytes
    health_states: list[str]
    failed_probes: int
    client_rates: list[float]

    def scrape_success(self) -> float:
        return sum(value for _, value in self.scrapes) / len(self.scrapes)

    def growth_mib_per_minute(self) -> float:
        return slope_per_minute(self.resident) / 2**20

    def median_rate(self) -> float:
        rates = sorted(self.client_rates)
        return rates[len(rates) // 2] if rates else 0.0

    def growth_bytes_per_request(self) -> float:
        rate = self.median_rate()  # no load measured: no evidence of flatness either
        return slope_per_minute(self.resident) / 60 / rate if rate else math.inf


def measure(stack: Stack, mode: str) -> Window:
    """Warm up, then watch the service for WINDOW_SECONDS: its health every 2 s, then what
    Prometheus scraped meanwhile."""
    time.sleep(WARM_UP_SECONDS)
    start = time.time()
    states: list[str] = []
    probes: dict[str, int] = {}  # a health probe's start -> its exit code
    while time.time() < start + WINDOW_SECONDS:
        health = stack.inspect("leaker")["State"]["Health"]
        states.append(health["Status"])
        probes.update({probe["Start"]: probe["ExitCode"] for probe in health["Log"]})
        time.sleep(2)  # the log keeps the last five probes, 5 s apart: none is missed
    end = time.time()
    time.sleep(2)  # the last scrapes land
    prometheus = stack.url("prometheus", "")
    scrapes = raw_samples(prometheus, 'up{job="leaker"}', start, end)
    resident = raw_samples(prometheus, 'process_resident_memory_bytes{job="leaker"}', start, end)
    rates = [float(rate) for rate in re.findall(r"([\d.]+) req/s now", stack.logs("client"))]
    window = Window(
        mode,
        scrapes,
        resident,
        states,
        sum(code != 0 for code in probes.values()),
        rates[-WINDOW_SECONDS // 5 :],
    )
    FIGURES.add(
        f"{mode}: {len(scrapes)} scrapes in {end - start:.0f} s, "
        f"{window.scrape_success():.2%} successful; health states seen: "
        f"{sorted(set(states))} ({len(states)} looks, {window.failed_probes} failed probes of "
        f"{len(probes)}); RSS {resident[0][1] / 2**20:.1f} -> {resident[-1][1] / 2**20:.1f} MiB, "
        f"{window.growth_mib_per_minute():.2f} MiB/min; client about {window.median_rate():.0f} "
        f"req/s, so {window.growth_bytes_per_request():.0f} B a request"
    )
    return window


@pytest.fixture(scope="module")
def leaky_window(stack: Stack) -> Window:
    return measure(stack, "leaky")


def test_the_client_drives_load(leaky_window: Window) -> None:
    assert leaky_window.client_rates and min(leaky_window.client_rates) > 0


def test_prometheus_scrapes_the_leaky_service_every_second(leaky_window: Window) -> None:
    assert len(leaky_window.scrapes) >= 0.95 * WINDOW_SECONDS
    assert leaky_window.scrape_success() >= MIN_SCRAPE_SUCCESS[heap_profiler()]


def test_the_health_check_holds_under_load_in_leaky_mode(leaky_window: Window) -> None:
    assert set(leaky_window.health_states) == {"healthy"}


def test_resident_memory_climbs_in_leaky_mode(leaky_window: Window) -> None:
    assert leaky_window.growth_mib_per_minute() > LEAKY_MIN_GROWTH_MIB_PER_MINUTE


def test_the_service_runs_the_heap_profiler_the_compose_file_names(stack: Stack) -> None:
    # `allocs` exists only while the sampler runs (a 404 without it, as Go's without a profile).
    allocs = stack.url("leaker", "/debug/pprof/allocs?debug=1")
    if heap_profiler() == "sampling":
        assert get(allocs).startswith(b"heap profile: ")
    else:
        with pytest.raises(urllib.error.HTTPError) as raised:
            get(allocs)
        assert raised.value.code == 404


def test_go_tool_pprof_names_the_leak(
    stack: Stack, leaky_window: Window, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    top = run_pprof(go, "-top", stack.url("leaker", "/debug/pprof/heap"))
    assert PROXY_METER_PREFIX in "\n".join(top.splitlines()[:25]), top
    cumulative = run_pprof(go, "-top", "-cum", stack.url("leaker", "/debug/pprof/heap"))
    assert PER_REQUEST_WRAPPER in "\n".join(cumulative.splitlines()[:25]), cumulative


def pprof_ui_top(stack: Stack) -> tuple[float, str]:
    """The heap total on the pprof service's top page ("... of 12.5MB total"), and the page."""
    page = get(stack.url("pprof", "/ui/top"), timeout=60).decode()
    match = re.search(r"of ([\d.]+)([kMG]?B) total", page)
    assert match, page[:2000]
    return float(match[1]) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[match[2]], page


def wait_for_pprof_ui(stack: Stack) -> tuple[float, str]:
    deadline = time.monotonic() + 120
    while True:
        try:
            return pprof_ui_top(stack)
        except OSError:
            assert time.monotonic() < deadline, (
                f"the pprof UI did not answer on {stack.url('pprof')}"
            )
            time.sleep(1)


def test_pprof_web_ui_shows_the_leak_and_restarting_it_refreshes(
    stack: Stack, leaky_window: Window
) -> None:
    # Its first profile was fetched as the service started: a sampled heap holds little leak yet.
    before, _ = wait_for_pprof_ui(stack)
    stack.run("restart", "pprof")
    after, page = wait_for_pprof_ui(stack)
    FIGURES.add(f"pprof UI heap total: {before / 1e6:.1f} MB, after a restart {after / 1e6:.1f} MB")
    assert after > before  # a new profile, of a heap that kept leaking
    assert PROXY_METER_PREFIX in page, "the pprof UI does not show the proxy meters"


@pytest.fixture(scope="module")
def fixed_window(stack: Stack, leaky_window: Window) -> Window:
    # As the README says: recreate only the service, Prometheus keeps its history.
    stack.environ = {"LEAK_MODE": "fixed"}
    stack.run("up", "--detach", "leaker")
    stack.wait_healthy("leaker")
    return measure(stack, "fixed")


def test_prometheus_scrapes_the_fixed_service_every_second(fixed_window: Window) -> None:
    assert len(fixed_window.scrapes) >= 0.95 * WINDOW_SECONDS
    assert fixed_window.scrape_success() >= MIN_SCRAPE_SUCCESS[heap_profiler()]


def test_the_health_check_holds_under_load_in_fixed_mode(fixed_window: Window) -> None:
    assert set(fixed_window.health_states) == {"healthy"}


def test_resident_memory_stays_flat_in_fixed_mode(
    leaky_window: Window, fixed_window: Window
) -> None:
    leak = leaky_window.growth_bytes_per_request()
    assert fixed_window.growth_bytes_per_request() < FIXED_MAX_SHARE_OF_LEAK * leak


def send_marked_requests(stack: Stack, marker: str) -> None:
    for number in range(MARKED_REQUESTS):
        headers = {"User-Agent": f"{marker}/{number}"}
        assert get(stack.url("leaker"), headers=headers) == b"OK\n"


def marked_server_spans(stack: Stack, marker: str) -> int:
    spans = zipkin_spans(stack.url("zipkin", ""), "leaker", 5000)
    return sum(
        span.get("kind") == "SERVER"
        and span.get("tags", {}).get("http.user_agent", "").startswith(marker + "/")
        for span in spans
    )


def leaker_exit_codes(stack: Stack, since: float) -> list[int]:
    died = events(since, time.time(), ["event=die", f"label=com.docker.compose.project={PROJECT}"])
    return [
        int(event["Actor"]["Attributes"]["exitCode"])
        for event in died
        if event["Actor"]["Attributes"].get("com.docker.compose.service") == "leaker"
    ]


def test_a_restart_delivers_the_spans_still_queued(stack: Stack, fixed_window: Window) -> None:
    stack.run("stop", "client")
    marker = "stack-restart-test"
    send_marked_requests(stack, marker)
    since = time.time()
    stack.run("restart", "leaker")  # SIGTERM, and SIGKILL after 10 s, as `docker stop`
    took = time.time() - since
    stack.wait_healthy("leaker")
    deadline = time.monotonic() + 30
    while (delivered := marked_server_spans(stack, marker)) < MARKED_REQUESTS:
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    codes = leaker_exit_codes(stack, since)
    FIGURES.add(f"restart: {took:.1f} s, exit codes {codes}, {delivered}/{MARKED_REQUESTS} spans")
    assert delivered == MARKED_REQUESTS
    assert codes and SIGKILL_EXIT not in codes
    assert took < GRACE_SECONDS


def cgroup_usage(stack: Stack) -> int:
    """The memory the service's container is charged for (cgroup v2, else v1), as Docker sees it."""
    read = (
        "cat /sys/fs/cgroup/memory.current 2>/dev/null"
        " || cat /sys/fs/cgroup/memory/memory.usage_in_bytes"
    )
    return int(stack.run("exec", "-T", "leaker", "sh", "-c", read).stdout)


def resident_bytes(stack: Stack) -> int:
    """The service process's resident memory, read from the host's /proc."""
    pid = stack.inspect("leaker")["State"]["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match, status
    return int(match[1]) * 1024


@pytest.fixture(scope="module")
def oom_run(stack: Stack, fixed_window: Window) -> dict[str, Any]:
    """Leaky mode at OOM_LIMIT: a heap profile when the limit is nearly reached, then the kill."""
    stack.environ = {"LEAK_MODE": "leaky", "LEAKER_MEMORY_LIMIT": OOM_LIMIT}
    since = time.time()
    stack.run("up", "--detach", "leaker", "client")
    stack.wait_healthy("leaker")
    limit = stack.inspect("leaker")["HostConfig"]["Memory"]
    run: dict[str, Any] = {"limit": limit}
    deadline = time.monotonic() + OOM_DEADLINE_SECONDS
    while cgroup_usage(stack) < limit - OOM_PROFILE_HEADROOM:
        assert time.monotonic() < deadline, "the service never neared its memory limit"
        assert stack.inspect("leaker")["RestartCount"] == 0, "killed before the profile"
        time.sleep(1)
    before = stack.inspect("leaker")["State"]
    run["resident_at_profile"] = resident_bytes(stack)
    run["charged_at_profile"] = cgroup_usage(stack)
    try:
        heap = stack.url("leaker", "/debug/pprof/heap")
        with urllib.request.urlopen(heap, timeout=120) as answer:
            run["profile_status"] = answer.status
    except urllib.error.HTTPError as error:
        run["profile_status"] = error.code
    after = stack.inspect("leaker")
    run["survived"] = (
        after["RestartCount"] == 0 and after["State"]["StartedAt"] == before["StartedAt"]
    )
    run["answers_after"] = get(stack.url("leaker")) == b"OK\n"
    run["log"] = stack.logs("leaker")
    while stack.inspect("leaker")["RestartCount"] == 0:
        assert time.monotonic() < deadline, f"no OOM restart within {OOM_DEADLINE_SECONDS} s"
        time.sleep(0.5)
    run["seconds_to_restart"] = time.time() - since
    state = stack.inspect("leaker")
    run["oom_killed_flag"] = state["State"]["OOMKilled"]
    oom = events(since, time.time(), ["event=oom", f"container={state['Id']}"])
    run["oom_events"] = len(oom)
    FIGURES.add(
        f"OOM at {limit / 2**20:.0f} MiB: heap profile at "
        f"{run['resident_at_profile'] / 2**20:.1f} MiB resident "
        f"({run['charged_at_profile'] / 2**20:.1f} MiB charged) answered {run['profile_status']}, "
        f"service survived: {run['survived']}; first OOM restart "
        f"{run['seconds_to_restart']:.0f} s after `up`, "
        f"State.OOMKilled={run['oom_killed_flag']}, oom events {run['oom_events']}"
    )
    stack.wait_healthy("leaker")
    return run


def test_a_heap_profile_just_before_the_limit_does_not_kill_the_service(
    oom_run: dict[str, Any],
) -> None:
    assert oom_run["survived"] and oom_run["answers_after"]
    if heap_profiler() == "tracemalloc" and oom_run["profile_status"] != 200:
        # The forked child's copy of the traces did not fit: the child died, with an error.
        assert oom_run["profile_status"] == CHILD_OUT_OF_MEMORY_STATUS
        assert CHILD_OUT_OF_MEMORY_TEXT in oom_run["log"]
    else:
        assert oom_run["profile_status"] == 200


def test_the_leaky_service_is_oom_killed_and_restarted(oom_run: dict[str, Any]) -> None:
    assert oom_run["oom_events"] >= 1
    assert oom_run["seconds_to_restart"] < OOM_DEADLINE_SECONDS


def test_compose_down_stops_the_service_before_zipkin_and_leaves_nothing(
    stack: Stack, oom_run: dict[str, Any]
) -> None:
    since = time.time()
    started = time.monotonic()
    stack.run("down")
    took = time.monotonic() - started
    died = events(since, time.time(), ["event=die", f"label=com.docker.compose.project={PROJECT}"])
    order = [event["Actor"]["Attributes"]["com.docker.compose.service"] for event in died]
    codes = {
        event["Actor"]["Attributes"]["com.docker.compose.service"]: int(
            event["Actor"]["Attributes"]["exitCode"]
        )
        for event in died
    }
    FIGURES.add(f"compose down: {took:.1f} s, stop order {order}, exit codes {codes}")
    assert order.index("leaker") < order.index("zipkin")
    assert codes["leaker"] != SIGKILL_EXIT
    label = f"label=com.docker.compose.project={PROJECT}"
    assert docker("ps", "--all", "--quiet", "--filter", label).split() == []
    assert docker("network", "ls", "--quiet", "--filter", label).split() == []
