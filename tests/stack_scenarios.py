"""The workshop stack test's scenarios (tests/test_stack_live.py): a mode under the client's
load, and the out-of-memory restart approached in counted steps. Each stores what it finds in
`found` as it goes (see tests/stack_report.py) and adds its figures to `figures`."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.stack import (
    ROOT,
    Stack,
    client_answered,
    events,
    get,
    raw_samples,
    slope_per_minute,
    zipkin_received,
)
from tests.stack_report import Figures

WARM_UP_SECONDS = 20  # after the service is healthy: imports done, caches filled
WINDOW_SECONDS = 60  # each mode is measured over this long under the client's load
SPAN_DRAIN_SECONDS = 60  # for the spans still queued when the client stops to reach Zipkin
QUEUE_FULL_LOG = "span queue full"  # app/tracing.py's line when spans were dropped
OOM_LIMIT = "80m"  # low enough for the kill within minutes, above the service's startup memory
# The heap profile is taken "just before" the kill: when the container's memory cgroup has this
# little left. A tracemalloc profile's child needs at least 13 MiB (asgi_pprof/forked.py).
OOM_PROFILE_HEADROOM = 16 * 2**20
# The leak is approached in counted steps, the client stopped: at about 1.2 KB a request, a step
# adds about 5 MB, well inside the headroom, however fast or slow the machine runs them.
REQUESTS_PER_STEP = 4000
MAX_STEPS = 100  # 400,000 requests: far more than 80m needs
OOM_DEADLINE_SECONDS = 600  # a bound for a failure to show, not a race: the kill comes in seconds


@dataclass
class Window:
    """One mode under load: Prometheus's samples and the health states seen meanwhile."""

    mode: str
    scrapes: list[tuple[float, float]]  # `up`: 1 for a successful scrape, 0 for a failed one
    resident: list[tuple[float, float]]  # process_resident_memory_bytes less the sampler's own
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


def measure(stack: Stack, mode: str, figures: Figures) -> Window:
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
    # The sampler's own tables grow towards their bound (PPROF_MEM_PROFILE_MAX_BYTES, 4 MiB) as it
    # meets the service's stacks and threads: that is the profiler's, not the service's growth.
    # (None with tracemalloc: nothing to take away.)
    own_metric = 'python_heap_profiler_own_bytes{job="leaker"}'
    own = dict(raw_samples(prometheus, own_metric, start, end, optional=True))
    service = [(t, value - own.get(t, 0.0)) for t, value in resident if t in own or not own]
    rates = [float(rate) for rate in re.findall(r"([\d.]+) req/s now", stack.logs("client"))]
    window = Window(
        mode,
        scrapes,
        service,
        states,
        sum(code != 0 for code in probes.values()),
        rates[-WINDOW_SECONDS // 5 :],
    )
    figures.add(
        f"{mode}: {len(scrapes)} scrapes in {end - start:.0f} s, "
        f"{window.scrape_success():.2%} successful; health states seen: "
        f"{sorted(set(states))} ({len(states)} looks, {window.failed_probes} failed probes of "
        f"{len(probes)}); RSS {resident[0][1] / 2**20:.1f} -> {resident[-1][1] / 2**20:.1f} MiB "
        f"(the sampler's own tables {service_own(own, 0)} -> {service_own(own, -1)} MiB); without "
        f"them {window.growth_mib_per_minute():.2f} MiB/min; client about "
        f"{window.median_rate():.0f} req/s, so {window.growth_bytes_per_request():.0f} B a request"
    )
    return window


def service_own(own: dict[float, float], index: int) -> str:
    return f"{own[sorted(own)[index]] / 2**20:.2f}" if own else "?"


def client_spans(stack: Stack, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """The client stopped, and its requests' spans given time to reach Zipkin: how many requests
    the client's container counted as answered, over all its rounds, and how many SERVER spans of
    the client's requests the Zipkin stand-in stored, both since `before` (an earlier result of
    this; empty from a real Zipkin, which cannot count them)."""
    stack.run("stop", "client")  # each round ends with its summary
    container = stack.container("client")
    answered, rounds = client_answered(stack.logs("client"))
    if before and before["container"] == container:  # else recreated: its logs start anew
        answered, rounds = answered - before["answered_total"], rounds - before["rounds_total"]
    deadline = time.monotonic() + SPAN_DRAIN_SECONDS
    while (counts := zipkin_received(stack.url("zipkin", ""))) is not None:
        received_total = counts["server_spans_by_user_agent"].get("leaker-load", 0)
        received = received_total - (before["received_total"] if before else 0)
        if received >= answered or time.monotonic() > deadline:
            answered_total, rounds_total = client_answered(stack.logs("client"))
            return {
                "answered": answered,
                "rounds": rounds,
                "received": received,
                "container": container,
                "answered_total": answered_total,
                "rounds_total": rounds_total,
                "received_total": received_total,
            }
        time.sleep(1)
    return {}


def measure_mode(stack: Stack, mode: str, found: dict[str, Any], figures: Figures) -> None:
    """The client's load on `mode` for WINDOW_SECONDS (`found["window"]`), then the spans its
    requests left in Zipkin, against those it counted as answered (`found["spans"]`)."""
    before = client_spans(stack)  # the client is stopped: nothing of an earlier mode still queued
    stack.environ = {"LEAK_MODE": mode}  # recreates the service if its mode changed
    stack.run("up", "--detach", "leaker", "client")
    stack.wait_healthy("leaker")
    found["window"] = window = measure(stack, mode, figures)
    if before and (spans := client_spans(stack, before)):
        found["spans"] = spans
        figures.add(
            f"{mode}: the Zipkin stand-in stored {spans['received']} SERVER spans of the client's "
            f"requests; the client counted {spans['answered']} answered in {spans['rounds']} "
            f"rounds (a round's last requests, cut short, are answered but not counted)"
        )
    found["queue_full_logged"] = QUEUE_FULL_LOG in stack.logs("leaker")
    assert window.client_rates, f"{mode}: the client reported no rate"


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


def load_step(stack: Stack) -> None:
    """REQUESTS_PER_STEP requests from this machine, as the client sends them."""
    command = [sys.executable, "-m", "app.cli", "load", "--url", stack.url("leaker")]
    command += ["--concurrency", "2", "--requests", str(REQUESTS_PER_STEP)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def near_the_limit(stack: Stack, found: dict[str, Any], figures: Figures) -> None:
    """Leaky mode at OOM_LIMIT: led by counted requests, the client stopped, to within
    OOM_PROFILE_HEADROOM of the limit; a heap profile there; then the client, until the kill."""
    stack.run("stop", "client")
    stack.environ = {"LEAK_MODE": "leaky", "LEAKER_MEMORY_LIMIT": OOM_LIMIT}
    stack.run("up", "--detach", "leaker")
    stack.wait_healthy("leaker")
    found["limit"] = limit = stack.inspect("leaker")["HostConfig"]["Memory"]
    steps = 0
    while cgroup_usage(stack) < limit - OOM_PROFILE_HEADROOM:
        assert steps < MAX_STEPS, f"{steps * REQUESTS_PER_STEP} requests and not near the limit"
        load_step(stack)
        steps += 1
    found["steps"] = steps
    before = stack.inspect("leaker")
    assert before["RestartCount"] == 0, "killed before the profile, within a step"
    found["resident_at_profile"] = resident_bytes(stack)
    found["charged_at_profile"] = cgroup_usage(stack)
    try:
        with urllib.request.urlopen(
            stack.url("leaker", "/debug/pprof/heap"), timeout=120
        ) as answer:
            found["profile_status"] = answer.status
    except urllib.error.HTTPError as error:
        found["profile_status"] = error.code
    after = stack.inspect("leaker")
    found["log"] = stack.logs("leaker")
    found["survived"] = after["State"]["StartedAt"] == before["State"]["StartedAt"]
    found["answers_after"] = get(stack.url("leaker")) == b"OK\n"  # nothing else loads it now
    figures.add(
        f"OOM at {limit / 2**20:.0f} MiB: after {steps * REQUESTS_PER_STEP} requests, a heap "
        f"profile at {found['resident_at_profile'] / 2**20:.1f} MiB resident "
        f"({found['charged_at_profile'] / 2**20:.1f} MiB charged) answered "
        f"{found['profile_status']}; service survived: {found['survived']}"
    )


def until_killed(stack: Stack, found: dict[str, Any], figures: Figures) -> None:
    since = time.time()
    stack.run("start", "client")
    deadline = time.monotonic() + OOM_DEADLINE_SECONDS
    while stack.inspect("leaker")["RestartCount"] == 0:
        assert time.monotonic() < deadline, f"no OOM restart within {OOM_DEADLINE_SECONDS} s"
        time.sleep(0.5)
    found["seconds_to_restart"] = time.time() - since
    state = stack.inspect("leaker")
    found["oom_killed_flag"] = state["State"]["OOMKilled"]
    oom = events(since, time.time(), ["event=oom", f"container={state['Id']}"])
    found["oom_events"] = len(oom)
    stack.wait_healthy("leaker")
    found["healthy_after_restart"] = True
    figures.add(
        f"OOM at {found['limit'] / 2**20:.0f} MiB: killed {found['seconds_to_restart']:.0f} s "
        f"after the client started again, State.OOMKilled={found['oom_killed_flag']}, oom events "
        f"{found['oom_events']}; healthy again"
    )
