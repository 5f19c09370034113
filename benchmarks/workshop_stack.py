"""The workshop stack as a user leaves it running: `docker compose up` in leaky mode for ten
minutes, measured from the outside.

    PYTHONPATH=. .venv/bin/python benchmarks/workshop_stack.py [--minutes 10] [--mode leaky]

Needs a Docker engine at DOCKER_HOST and Compose (.ci/run starts one; see the README), and the
images (`.ci/stand-ins/build` where no registry answers). It brings the stack up under its own
project name with the compose file's defaults, waits, and prints:

- the out-of-memory restarts: when the service started again after it first started, and
  between restarts;
- Prometheus's scrapes of the service: all of them, and those outside the restarts (a failed
  scrape is in a restart when the scrapes that succeeded on either side of it saw two different
  processes, by `process_start_time_seconds`), and the longest scrape;
- the spans: the client stopped at the end, every round's answered requests against the SERVER
  spans of the client's requests that the Zipkin stand-in stored (a killed service loses the
  spans it had queued, at most 0.5 s of them: see app/tracing.py), and the service's log lines
  saying spans were dropped;

and, where chromium is installed, keeps Prometheus's graph of the run, as the README's link
draws it, in out/workshop-stack/prometheus-sawtooth.png. It takes the stack down at the end.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
import urllib.parse
from collections.abc import Sequence

from scripts.screenshots import screenshot
from tests.stack import (
    ROOT,
    EngineUnavailable,
    Stack,
    client_answered,
    compose_command,
    docker_json,
    raw_samples,
    zipkin_received,
)

PROJECT = "leaker-workshop-bench"
DRAIN_SECONDS = 60
SAWTOOTH_PNG = ROOT / "out" / "workshop-stack" / "prometheus-sawtooth.png"
SAWTOOTH_QUERY = 'process_resident_memory_bytes{job="leaker"}'  # the README link's first graph


def sawtooth(prometheus: str, minutes: float) -> None:
    """Prometheus's graph of the run's resident memory, as chromium draws it."""
    query = {
        "g0.expr": SAWTOOTH_QUERY,
        "g0.tab": "0",
        "g0.range_input": f"{math.ceil(minutes) + 1}m",
    }
    SAWTOOTH_PNG.parent.mkdir(parents=True, exist_ok=True)
    screenshot(f"{prometheus}/graph?{urllib.parse.urlencode(query)}", SAWTOOTH_PNG, (1280, 860))
    print(f"Prometheus's graph: {SAWTOOTH_PNG.relative_to(ROOT)}")


def process_starts(prometheus: str, since: float, until: float) -> list[float]:
    """When each of the service's processes started, as it told Prometheus, in order: the first,
    then one per restart. (Not `docker events`: the engine keeps only its last 256 events, and
    the health check's make 36 a minute.)"""
    samples = raw_samples(prometheus, 'process_start_time_seconds{job="leaker"}', since, until)
    return sorted({value for _, value in samples})


def scrape_figures(prometheus: str, start: float, end: float) -> str:
    up = raw_samples(prometheus, 'up{job="leaker"}', start, end)
    started = dict(raw_samples(prometheus, 'process_start_time_seconds{job="leaker"}', start, end))
    durations = raw_samples(prometheus, 'scrape_duration_seconds{job="leaker"}', start, end)
    succeeded = [t for t, value in up if value == 1]
    in_restarts = 0
    for failed in (t for t, value in up if value == 0):
        before = max((t for t in succeeded if t < failed), default=None)
        after = min((t for t in succeeded if t > failed), default=None)
        if before is None or after is None or started[before] != started[after]:
            in_restarts += 1
    outside = len(up) - in_restarts
    slow = sum(value > 0.5 for _, value in durations)
    return (
        f"scrapes: {len(succeeded)} of {len(up)} successful ({len(succeeded) / len(up):.2%}); "
        f"{in_restarts} failed in restarts; outside the restarts {len(succeeded)} of {outside} "
        f"({len(succeeded) / outside:.2%}); longest scrape "
        f"{max(value for _, value in durations):.3f} s, {slow} over 0.5 s"
    )


def span_figures(stack: Stack) -> str:
    stack.run("stop", "client")  # each round ends with its summary
    answered, rounds = client_answered(stack.logs("client"))
    deadline = time.monotonic() + DRAIN_SECONDS
    received = 0
    while (counts := zipkin_received(stack.url("zipkin", ""))) is not None:
        received = counts["server_spans_by_user_agent"].get("leaker-load", 0)
        if received >= answered or time.monotonic() > deadline:
            break
        time.sleep(1)
    if counts is None:
        return "spans: not counted (a real Zipkin has no /stand-in/received)"
    dropped_lines = stack.logs("leaker").count("span queue full")
    return (
        f"spans: {received} SERVER spans of the client's requests stored by the Zipkin stand-in, "
        f"{answered} answered in {rounds} rounds ({received / answered:.4f}); rejected lists "
        f"{counts['rejected_lists']}; 'span queue full' logged {dropped_lines} times"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--mode", choices=("leaky", "fixed"), default="leaky")
    arguments = parser.parse_args(argv)
    try:
        compose = compose_command()
    except EngineUnavailable as error:
        raise SystemExit(f"workshop_stack: {error} (see the README's workshop section)") from None
    stack = Stack(compose, environ={"LEAK_MODE": arguments.mode}, project=PROJECT)
    stack.run("down", "--remove-orphans")
    print(f"docker compose up --build, {arguments.mode} mode, for {arguments.minutes:g} minutes")
    since = time.time()
    stack.run("up", "--detach", "--build")
    end = time.time() + arguments.minutes * 60  # ten minutes of the stack running
    try:
        time.sleep(max(end - time.time(), 0))
        prometheus = stack.url("prometheus", "")
        starts = process_starts(prometheus, since, time.time())
        first_start = starts[0]
        steps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
        state = docker_json("inspect", stack.container("leaker"))[0]
        print(
            f"restarts: {len(steps)} (Docker's RestartCount {state['RestartCount']}, the last "
            f"one OOMKilled: {state['State']['OOMKilled']}); the service started again "
            f"{', '.join(f'{step:.0f}' for step in steps) or '-'} s after the one before"
        )
        print(scrape_figures(prometheus, first_start, end))
        if shutil.which("chromium"):
            sawtooth(prometheus, arguments.minutes)
        print(span_figures(stack))
        limit = state["HostConfig"]["Memory"]
        print(f"memory limit {limit / 2**20:.0f} MiB; measured {time.strftime('%Y-%m-%d')}")
    finally:
        stack.run("down", check=False)


if __name__ == "__main__":
    main()
