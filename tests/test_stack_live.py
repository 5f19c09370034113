"""The workshop, run for real: `docker compose up` as a user types it, and what it promises.

The tests run in file order against one stack (project `leaker-stack-test`): leaky mode under the
client's load, the same service switched to fixed mode, a restart, the out-of-memory restart at a
low limit, and `docker compose down`. They need a Docker engine (DOCKER_HOST) and Compose; without
them they are skipped with the reason, except under CI=true, where .ci/run starts an engine, and a
missing one is a failure. The images come from a registry where one answers, else from the
stand-ins .ci/stand-ins/build makes (see .ci/run).

Each scenario runs once and records what it found (tests/stack_report.py); each outcome is a test
of its own, so a scenario that fails halfway fails the tests that needed the rest, and errors
none. Nothing here races the leak or a timer: the heap profile "just before the limit" is taken
after a counted number of requests, with the client stopped, not while the client keeps leaking.
The figures they measure (scrape success, health, RSS growth, spans, the OOM restart) and the
screenshots they take are printed and kept in out/stack-test/, whether the tests pass or not.
"""

from __future__ import annotations

import html
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from scripts.screenshots import leaking_line, screenshot
from tests.browser import rendered_dom
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
    zipkin_span_names,
    zipkin_spans,
)
from tests.stack_report import Figures, Scenario, figure_path, run_scenario
from tests.stack_scenarios import (
    QUEUE_FULL_LOG,
    WINDOW_SECONDS,
    measure_mode,
    near_the_limit,
    until_killed,
)
from tests.zipkin_receiver import span_list_errors, without_nulls

# The workshop's target: 99% of scrapes succeed under load. The sampling profiler is what holds it
# with room to spare. With tracemalloc tracing every allocation, the service answers about 30
# requests/s here and a scrape waits behind up to two of them: one run on a quiet machine scraped
# 100% in both modes, runs beside other jobs on the same two cores 96.8% to 98.9%. So with
# tracemalloc this checks the 95% it holds there, below the target (see the README).
MIN_SCRAPE_SUCCESS = {"sampling": 0.99, "tracemalloc": 0.95}
LEAKY_MIN_GROWTH_MIB_PER_MINUTE = 3.0
# Flat next to the leak: at a thousand requests a second the fixed service's allocator still
# settles for a minute or two (0.4 to 2.5 MiB a minute measured, 8 to 51 B a request), where the
# leak costs about 1,100 B a request. Per request, because the client's rate moves run to run.
# On a machine at load average 8 the fixed service grew 127 B a request over its window (bounded
# queues filling while starved of CPU, not a leak): a quarter of the leak still tells the two
# apart, and fixed mode built as leaky would be far over it.
FIXED_MAX_SHARE_OF_LEAK = 0.25
GRACE_SECONDS = 10  # Docker's default between SIGTERM and SIGKILL
SIGKILL_EXIT = 137
MARKED_REQUESTS = 20
PROXY_METER_PREFIX = "opentelemetry.metrics._internal._ProxyMeter"
PROXY_METER = "_ProxyMeter"  # as pprof's graph labels it
PER_REQUEST_WRAPPER = "app.main.OpenTelemetryPerRequest.__call__"
MAIN_PY = ROOT / "app" / "main.py"
# The handlers answer asgi_pprof.forked.ChildOutOfMemory with a 503 and its message.
CHILD_OUT_OF_MEMORY_STATUS = 503
CHILD_OUT_OF_MEMORY_TEXT = "heap profile not built"
# The README's ready-made Prometheus link: the graph the workshop is about.
README_GRAPH_LINK = re.compile(r"\((http://localhost:9090/graph\?[^)\s]+)\)")
SCREENSHOT_SIZE = (1280, 900)
# Both of the link's graphs: shorter, the page scrolls to its focused second query, mid-graph.
PROMETHEUS_SCREENSHOT_SIZE = (1280, 1450)


def heap_profiler() -> str:
    """The stack's heap profiler: the compose file's PPROF_HEAP_PROFILER default, if it has one."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    value = str(services["leaker"]["environment"].get("PPROF_HEAP_PROFILER", "tracemalloc"))
    match = re.fullmatch(r"\$\{PPROF_HEAP_PROFILER:-(\w+)\}", value)
    return match[1] if match else value


def scrape_interval_seconds() -> float:
    """prometheus/prometheus.yml's global scrape interval ("2s")."""
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    return float(config["global"]["scrape_interval"].removesuffix("s"))


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
    written = FIGURES.write()
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():  # past pytest's capture, into the CI log
            lines = "\n".join(FIGURES.lines)
            print(f"\n== the workshop stack, measured (kept in {written.parent})\n{lines}")


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


@pytest.fixture(scope="module")
def leaky(stack: Stack) -> Scenario:
    return run_scenario("leaky mode", lambda found: measure_mode(stack, "leaky", found, FIGURES))


def test_the_client_drives_load(leaky: Scenario) -> None:
    assert min(leaky["window"].client_rates) > 0


def test_prometheus_scrapes_the_leaky_service_at_its_interval(leaky: Scenario) -> None:
    window = leaky["window"]
    assert len(window.scrapes) >= 0.95 * WINDOW_SECONDS / scrape_interval_seconds()
    assert window.scrape_success() >= MIN_SCRAPE_SUCCESS[heap_profiler()]


def test_the_health_check_holds_under_load_in_leaky_mode(leaky: Scenario) -> None:
    assert set(leaky["window"].health_states) == {"healthy"}


def test_resident_memory_climbs_in_leaky_mode(leaky: Scenario) -> None:
    assert leaky["window"].growth_mib_per_minute() > LEAKY_MIN_GROWTH_MIB_PER_MINUTE


def assert_no_span_dropped(scenario: Scenario) -> None:
    if "spans" not in scenario.found and scenario.error is None:
        pytest.skip("the real Zipkin cannot count the spans it received (the stand-in can)")
    spans = scenario["spans"]
    assert spans["answered"] > 0
    # At least one span per answered request: none was dropped on the way.
    assert spans["received"] >= spans["answered"], spans
    assert not scenario["queue_full_logged"], f"the service logged {QUEUE_FULL_LOG!r}"


def test_no_span_is_dropped_at_the_default_load_in_leaky_mode(leaky: Scenario) -> None:
    assert_no_span_dropped(leaky)


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
    stack: Stack, leaky: Scenario, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    leaky["window"]  # the leak has had its minute of load
    top = run_pprof(go, "-top", stack.url("leaker", "/debug/pprof/heap"))
    assert PROXY_METER_PREFIX in "\n".join(top.splitlines()[:25]), top
    cumulative = run_pprof(go, "-top", "-cum", stack.url("leaker", "/debug/pprof/heap"))
    assert PER_REQUEST_WRAPPER in "\n".join(cumulative.splitlines()[:25]), cumulative


def test_the_readmes_prometheus_graph_draws_the_memory(
    stack: Stack, leaky: Scenario, require_tool: Callable[[str], str]
) -> None:
    chromium = require_tool("chromium")
    leaky["window"]  # a minute of samples to draw
    link = README_GRAPH_LINK.search((ROOT / "README.md").read_text())
    assert link, "the README has no ready-made Prometheus graph link"
    url = link[1].replace("localhost:9090", f"localhost:{stack.ports['prometheus']}")
    with urllib.request.urlopen(url, timeout=30) as answer:  # an error page answers 500
        assert answer.status == 200
    dom = rendered_dom(chromium, url)
    # Each graph is an SVG path through its samples (Rickshaw's `path` class), and the error
    # boxes stay hidden.
    lines = re.findall(r'<path class="path" d="M([^"]*)"', dom)
    assert lines and all(line.count("L") >= 10 for line in lines), dom[:3000]
    errors = re.findall(r'class="error alert alert-danger"([^>]*)>', dom)
    assert errors and all("display: none" in attributes for attributes in errors), errors
    screenshot(url, figure_path("prometheus-graph.png"), PROMETHEUS_SCREENSHOT_SIZE)


def first_pprof_page(stack: Stack) -> str:
    """The pprof UI's first page (its graph), as soon as it answers: it takes its profile over
    the service's first minute, then starts serving."""
    deadline = time.monotonic() + 180
    while True:
        try:
            return get(stack.url("pprof", "/ui/"), timeout=60).decode()
        except OSError:
            assert time.monotonic() < deadline, (
                f"the pprof UI did not answer on {stack.url('pprof')}"
            )
            time.sleep(1)


def test_the_pprof_ui_shows_the_leak_on_first_open(
    stack: Stack, leaky: Scenario, require_tool: Callable[[str], str]
) -> None:
    chromium = require_tool("chromium")
    leaky["window"]  # a minute into the leaky run
    page = first_pprof_page(stack)
    assert PROXY_METER in page, "the pprof UI's first page does not show the proxy meters"
    # At line level, from the leaking line of app/main.py down.
    assert f"main.py:{leaking_line(MAIN_PY)}" in page
    source = get(stack.url("pprof", "/ui/source?f=OpenTelemetryPerRequest"), timeout=60).decode()
    leak = MAIN_PY.read_text().splitlines()[leaking_line(MAIN_PY) - 1].strip()
    assert html.escape(leak) in source, "the source view does not show app/main.py"
    screenshot(stack.url("pprof", "/ui/"), figure_path("pprof-ui.png"), SCREENSHOT_SIZE)
    assert "_ProxyMeter" in rendered_dom(chromium, stack.url("pprof", "/ui/"))


@pytest.fixture(scope="module")
def fixed(stack: Stack, leaky: Scenario) -> Scenario:
    # As the README says: recreate only the service, Prometheus keeps its history.
    return run_scenario("fixed mode", lambda found: measure_mode(stack, "fixed", found, FIGURES))


def test_prometheus_scrapes_the_fixed_service_at_its_interval(fixed: Scenario) -> None:
    window = fixed["window"]
    assert len(window.scrapes) >= 0.95 * WINDOW_SECONDS / scrape_interval_seconds()
    assert window.scrape_success() >= MIN_SCRAPE_SUCCESS[heap_profiler()]


def test_the_health_check_holds_under_load_in_fixed_mode(fixed: Scenario) -> None:
    assert set(fixed["window"].health_states) == {"healthy"}


def test_resident_memory_stays_flat_in_fixed_mode(leaky: Scenario, fixed: Scenario) -> None:
    leak = leaky["window"].growth_bytes_per_request()
    assert fixed["window"].growth_bytes_per_request() < FIXED_MAX_SHARE_OF_LEAK * leak


def test_no_span_is_dropped_at_the_default_load_in_fixed_mode(fixed: Scenario) -> None:
    assert_no_span_dropped(fixed)


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


def test_a_restart_delivers_the_spans_still_queued(stack: Stack, fixed: Scenario) -> None:
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


@pytest.fixture(scope="module")
def oom(stack: Stack, fixed: Scenario) -> Scenario:
    def steps(found: dict[str, Any]) -> None:
        near_the_limit(stack, found, FIGURES)
        until_killed(stack, found, FIGURES)

    return run_scenario("out-of-memory restart", steps)


def test_a_heap_profile_near_the_limit_is_answered(oom: Scenario) -> None:
    if heap_profiler() == "tracemalloc" and oom["profile_status"] != 200:
        # The forked child's copy of the traces did not fit: the child died, with an error.
        assert oom["profile_status"] == CHILD_OUT_OF_MEMORY_STATUS
        assert CHILD_OUT_OF_MEMORY_TEXT in oom["log"]
    else:
        assert oom["profile_status"] == 200


def test_a_heap_profile_near_the_limit_does_not_kill_the_service(oom: Scenario) -> None:
    assert oom["survived"] and oom["answers_after"]


def test_the_leaky_service_is_oom_killed(oom: Scenario) -> None:
    assert oom["oom_events"] >= 1


def test_docker_restarts_the_killed_service(oom: Scenario) -> None:
    assert oom["healthy_after_restart"]


def test_compose_down_stops_the_service_before_zipkin_and_leaves_nothing(stack: Stack) -> None:
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
