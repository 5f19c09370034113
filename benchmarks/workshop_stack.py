"""The workshop stack as a user leaves it running: `docker compose up` in leaky mode for ten
minutes, measured from the outside.

    PYTHONPATH=. .venv/bin/python benchmarks/workshop_stack.py [--minutes 10] [--mode leaky]

Needs a Docker engine at DOCKER_HOST and Compose (.ci/run starts one; see the README), and the
images (`.ci/stand-ins/build` where no registry answers). It brings the stack up under its own
project name with the compose file's defaults, waits, and prints:

- the out-of-memory restarts: when each came after the service first started, and between them
  (`docker events`);
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
    Stack,
    client_answered,
    compose_command,
    docker_json,
    events,
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


def restarts(stack: Stack, since: float, until: float) -> tuple[float, list[float]]:
    """When the service first started, and when each out-of-memory kill came (Unix times)."""
    first_start = min(
        event["timeNano"] / 1e9
        for event in events(
            since, until, ["event=start", f"label=com.docker.compose.project={PROJECT}"]
        )
        if event["Actor"]["Attributes"].get("com.docker.compose.service") == "leaker"
    )
    container = stack.container("leaker")
    kills = [
        event["timeNano"] / 1e9
        for event in events(since, until, ["event=oom", f"container={container}"])
    ]
    return first_start, kills


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
        f"{max(value for _, value in durations):.3f} s (timeout 1 s), {slow} over 0.5 s"
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
    stack = Stack(compose_command(), environ={"LEAK_MODE": arguments.mode}, project=PROJECT)
    stack.run("down", "--remove-orphans")
    print(f"docker compose up --build, {arguments.mode} mode, for {arguments.minutes:g} minutes")
    since = time.time()
    stack.run("up", "--detach", "--build")
    end = since + arguments.minutes * 60
    try:
        time.sleep(max(end - time.time(), 0))
        first_start, kills = restarts(stack, since, time.time())
        steps = [kill - before for before, kill in zip([first_start, *kills], kills, strict=False)]
        print(
            f"out-of-memory restarts: {len(kills)}; first {steps[0]:.0f} s after the service "
            f"started, then every {', '.join(f'{s:.0f}' for s in steps[1:]) or '-'} s"
            if kills
            else "out-of-memory restarts: none"
        )
        print(scrape_figures(stack.url("prometheus", ""), first_start, end))
        if shutil.which("chromium"):
            sawtooth(stack.url("prometheus", ""), arguments.minutes)
        print(span_figures(stack))
        limit = docker_json("inspect", stack.container("leaker"))[0]["HostConfig"]["Memory"]
        print(f"memory limit {limit / 2**20:.0f} MiB; measured {time.strftime('%Y-%m-%d')}")
    finally:
        stack.run("down", check=False)


if __name__ == "__main__":
    main()
