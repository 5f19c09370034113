"""What /debug/pprof costs a running service: requests/s of a fixed-mode service with the endpoints
not mounted, mounted and idle, and with tracemalloc tracing from startup at several depths.

    PYTHONPATH=. .venv/bin/python benchmarks/service_throughput.py [--seconds 5] [--rounds 3]

Each configuration runs as its own service (no trace export); `hey -c 50 -z Ns` drives it, after a
warm-up, for R rounds that take turns across configurations, so that background noise falls on all
of them alike. The target: mounted-and-idle at least 0.97 of not-mounted (median of rounds).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from tests.service import running_service

CONFIGURATIONS: dict[str, dict[str, str]] = {
    "not mounted (PPROF_ENABLED=false)": {"PPROF_ENABLED": "false"},
    "mounted, idle (on-demand)": {"PPROF_ENABLED": "true", "PPROF_TRACEMALLOC": "on-demand"},
    **{
        f"tracing from startup, {frames} frames": {
            "PPROF_TRACEMALLOC": "startup",
            "PPROF_TRACEMALLOC_FRAMES": str(frames),
        }
        for frames in (1, 8, 16, 32)
    },
}


def hey(url: str, seconds: float) -> float:
    output = subprocess.run(
        ["hey", "-c", "50", "-z", f"{seconds}s", url], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not match:
        raise RuntimeError(f"no req/s in hey's output:\n{output}")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("hey is needed: apt-get install hey")

    rates: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        services = {
            name: stack.enter_context(running_service({"LEAK_MODE": "fixed", **env}, tmp))
            for name, env in CONFIGURATIONS.items()
        }
        for service in services.values():
            hey(service.url + "/", 1.0)  # warm-up
        for round_number in range(args.rounds):
            for name, service in services.items():
                rates[name].append(hey(service.url + "/", args.seconds))
                print(f"round {round_number + 1}: {name}: {rates[name][-1]:.0f} req/s", flush=True)

    baseline = statistics.median(rates["not mounted (PPROF_ENABLED=false)"])
    print()
    print("| fixed-mode service | req/s (median) | vs not mounted |")
    print("| --- | ---: | ---: |")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {median / baseline:.2f} |")
    idle = statistics.median(rates["mounted, idle (on-demand)"]) / baseline
    print(f"\nmounted-and-idle / not-mounted = {idle:.3f} (target >= 0.97)")
    return 0 if idle >= 0.97 else 1


if __name__ == "__main__":
    sys.exit(main())
