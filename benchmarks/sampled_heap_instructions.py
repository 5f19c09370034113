"""Instructions per request, and per allocation, with each heap profiler: repeatable, unlike time.

    PYTHONPATH=. .venv/bin/python benchmarks/sampled_heap_instructions.py [--requests 600]

`valgrind --tool=callgrind` counts the instructions of a process (perf stat is not supported on
this machine). Each configuration runs twice, with N/6 and N in-process requests to a fixed-mode
app (plain ASGI calls, no HTTP, no trace export), after a warm-up; the difference divided by the
difference in requests is the cost of one request, without the interpreter's start and imports.
The same for the pure allocation workload of tests/heap_profilers.py. The ratios to `none` are
what the profiler costs; the issue's goal for sampling at 512 KiB is a few percent.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys

from tests import heap_profilers

WARMUP_REQUESTS = 100


def worker(configuration: str, workload: str, count: int) -> None:
    if workload == "requests":
        from app.main import create_app
        from app.settings import Settings
        from tests.leak_probe import drive

        app = create_app(Settings(leak_mode="fixed", traces_exporter="none"))
        asyncio.run(drive(app, WARMUP_REQUESTS))
        heap_profilers.start(configuration)
        asyncio.run(drive(app, count))
    else:
        heap_profilers.allocate(1000)
        heap_profilers.start(configuration)
        heap_profilers.allocate(count)


def instructions(configuration: str, workload: str, count: int) -> int:
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--worker", configuration, workload, str(count),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    match = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"callgrind failed:\n{result.stderr[-3000:]}")
    return int(match[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--allocations", type=int, default=300_000)
    parser.add_argument("--worker", nargs=3, metavar=("CONFIGURATION", "WORKLOAD", "COUNT"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return 0
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    per_unit: dict[tuple[str, str], float] = {}
    for workload, count, unit in (
        ("requests", args.requests, "request"),
        ("allocations", args.allocations, "iteration (6 blocks)"),
    ):
        small = count // 6
        for name in heap_profilers.CONFIGURATIONS:
            extra = instructions(name, workload, count) - instructions(name, workload, small)
            per_unit[workload, name] = extra / (count - small)
            print(f"{workload}: {name}: {per_unit[workload, name]:,.0f} instructions per {unit}")
    for workload in ("requests", "allocations"):
        print(f"\n| {workload} | instructions per unit | vs none |\n| --- | ---: | ---: |")
        baseline = per_unit[workload, "none"]
        for name in heap_profilers.CONFIGURATIONS:
            value = per_unit[workload, name]
            print(f"| {name} | {value:,.0f} | {value / baseline:.3f} |")
    ratio = per_unit["requests", "sampling 512 KiB"] / per_unit["requests", "none"]
    print(f"\nsampling at 512 KiB: {100 * (ratio - 1):+.1f}% instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
