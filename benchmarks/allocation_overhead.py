"""The floor of each heap profiler: time per iteration of a pure allocation loop, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/allocation_overhead.py [--iterations N] [--rounds 7]

Every allocation goes through the hooks, so this is where wrapping malloc and free shows, with
nothing else to hide it (a request does much more than allocate). Each round runs every
configuration of tests/heap_profilers.py once, in a fresh process, in turn; each round's ratio to
`none` is taken within the round. Printed: medians and the spread of the ratios.
benchmarks/sampled_heap_instructions.py counts the same loop's instructions, repeatably.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from tests import heap_profilers


def worker(configuration: str, iterations: int) -> None:
    heap_profilers.allocate(10_000)
    heap_profilers.start(configuration)
    started = time.perf_counter()
    heap_profilers.allocate(iterations)
    print((time.perf_counter() - started) / iterations * 1e9)


def nanoseconds(configuration: str, iterations: int) -> float:
    command = [sys.executable, __file__, "--worker", configuration, "--iterations", str(iterations)]
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.iterations)
        return 0
    names = list(heap_profilers.CONFIGURATIONS)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(args.rounds):
        order = names[round_number % len(names) :] + names[: round_number % len(names)]
        for name in order:
            times[name].append(nanoseconds(name, args.iterations))
        line = ", ".join(f"{name} {times[name][-1]:.0f}" for name in names)
        print(f"round {round_number + 1} (ns per iteration): {line}", flush=True)
    print("\n| allocation loop (6 blocks an iteration) | ns (median) | vs none: median | lowest |"
          " highest |\n| --- | ---: | ---: | ---: | ---: |")  # fmt: skip
    for name in names:
        ratios = [t / none for t, none in zip(times[name], times["none"], strict=True)]
        print(
            f"| {name} | {statistics.median(times[name]):.0f} | {statistics.median(ratios):.3f} | "
            f"{min(ratios):.3f} | {max(ratios):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
