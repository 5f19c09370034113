"""What each heap profiler costs a running service: requests/s of fixed-mode services side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/sampled_heap_throughput.py [--seconds 5] [--rounds 7]

One service per configuration of tests/heap_profilers.py (no trace export): none, the sampling
heap profiler at 512 KiB and 64 KiB, tracemalloc from startup at 1 and 8 frames. `hey -c 50 -z Ns`
drives them in turn, round after round, so that the machine's noise falls on all of them alike;
each round's ratio to `none` is taken within the round. Printed: the median ratio and its spread
(lowest and highest round). The goal: sampling at 512 KiB at least 0.97 of none.
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

from tests import heap_profilers
from tests.service import running_service

GOAL = 0.97


def hey(url: str, seconds: float) -> float:
    """Requests/s of `hey -c 50 -z Ns`; fails unless every answer was a 200 (hey counts errors
    in its rate, so a broken service would look fast)."""
    output = subprocess.run(
        ["hey", "-c", "50", "-z", f"{seconds}s", url], capture_output=True, text=True, check=True
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    codes = re.findall(r"^\s+\[(\d+)\]\s+\d+ responses", output, re.M)
    if not rate or codes != ["200"] or "Error distribution" in output:
        raise RuntimeError(f"not every request answered 200:\n{output}")
    return float(rate[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("hey is needed: apt-get install hey")
    names = list(heap_profilers.CONFIGURATIONS)
    rates: dict[str, list[float]] = {name: [] for name in names}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        services = {
            name: stack.enter_context(running_service({"LEAK_MODE": "fixed", **env}, tmp))
            for name, env in heap_profilers.CONFIGURATIONS.items()
        }
        for service in services.values():
            hey(service.url + "/", 2.0)  # warm-up
        for round_number in range(args.rounds):
            # Each round starts with another configuration, so none always goes first or last.
            order = names[round_number % len(names) :] + names[: round_number % len(names)]
            for name in order:
                rates[name].append(hey(services[name].url + "/", args.seconds))
            line = ", ".join(f"{name} {rates[name][-1]:.0f}" for name in names)
            print(f"round {round_number + 1} (req/s): {line}", flush=True)
    print("\n| fixed-mode service | req/s (median) | vs none: median | lowest | highest |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ratios = {}
    for name in names:
        ratios[name] = [rate / none for rate, none in zip(rates[name], rates["none"], strict=True)]
        print(
            f"| {name} | {statistics.median(rates[name]):.0f} | "
            f"{statistics.median(ratios[name]):.3f} | {min(ratios[name]):.3f} | "
            f"{max(ratios[name]):.3f} |"
        )
    sampled = statistics.median(ratios["sampling 512 KiB"])
    print(f"\nsampling at 512 KiB / none = {sampled:.3f} (median of {args.rounds}; goal >= {GOAL})")
    return 0 if sampled >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
