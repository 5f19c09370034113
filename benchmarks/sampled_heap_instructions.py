"""Instructions per request, and per allocation, with each heap profiler: repeatable, unlike time.

    PYTHONPATH=. .venv/bin/python benchmarks/sampled_heap_instructions.py [--requests 600]
        [--configuration NAME ...] [--workload requests|allocations] [--threads N]

`valgrind --tool=callgrind` counts the instructions of a process (perf stat is not supported on
this machine). Each configuration runs twice, with N/6 and N in-process requests to a fixed-mode
app (plain ASGI calls, no HTTP, no trace export), after a warm-up; the difference divided by the
difference in requests is the cost of one request, without the interpreter's start and imports.
The same for the pure allocation workload of tests/heap_profilers.py, run by `--threads N`
threads at once (what a free-threaded build runs in parallel). The ratios to `none` are what the
profiler costs. Any interpreter with the service's dependencies runs it: the workers run under
the interpreter that runs this script. `labels` is sampling at 512 KiB with the service's
LabelMiddleware and thread numbers on: against `sampling 512 KiB`, what labels cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading

from tests import heap_profilers

WARMUP_REQUESTS = 100


def worker(configuration: str, workload: str, count: int, threads: int) -> None:
    if workload == "requests":
        from app.main import create_app
        from app.settings import Settings
        from tests.leak_probe import drive

        labels = configuration == "labels"
        settings = Settings(leak_mode="fixed", traces_exporter="none", pprof_labels=labels)
        app = create_app(settings)
        asyncio.run(drive(app, WARMUP_REQUESTS))
        heap_profilers.start(configuration)
        asyncio.run(drive(app, count))
    else:
        heap_profilers.allocate(1000)
        heap_profilers.start(configuration)
        workers = [
            threading.Thread(target=heap_profilers.allocate, args=(count,)) for _ in range(threads)
        ]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()


def instructions(configuration: str, workload: str, count: int, threads: int = 1) -> int:
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--worker", configuration, workload, str(count), str(threads),
    ]  # fmt: skip
    # Python randomizes str hashes per process: dict probes, and so instruction counts, would vary
    # from run to run by a percent. One seed makes every run count the same.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    match = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"callgrind failed:\n{result.stderr[-3000:]}")
    return int(match[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--allocations", type=int, default=300_000)
    parser.add_argument("--configuration", action="append", choices=heap_profilers.CONFIGURATIONS)
    parser.add_argument("--workload", action="append", choices=["requests", "allocations"])
    parser.add_argument("--threads", type=int, default=1, help="allocation workload's threads")
    parser.add_argument("--worker", nargs=4, metavar=("CONFIGURATION", "WORKLOAD", "COUNT", "N"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]), int(args.worker[3]))
        return 0
    configurations = args.configuration or list(heap_profilers.CONFIGURATIONS)
    workloads = args.workload or ["requests", "allocations"]
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    if "none" not in configurations:
        configurations.insert(0, "none")
    per_unit: dict[tuple[str, str], float] = {}
    units = {"requests": (args.requests, "request"), "allocations": (args.allocations, "iteration")}
    for workload in workloads:
        count, unit = units[workload]
        small = count // 6
        for name in configurations:
            extra = instructions(name, workload, count, args.threads) - instructions(
                name, workload, small, args.threads
            )
            per_unit[workload, name] = extra / (count - small)
            print(f"{workload}: {name}: {per_unit[workload, name]:,.0f} instructions per {unit}")
    print(f"\n{sys.version.split()[0]} {sysconfig.get_config_var('Py_GIL_DISABLED') and 't' or ''}"
          f", allocation threads: {args.threads}")  # fmt: skip
    for workload in workloads:
        print(f"\n| {workload} | instructions per unit | vs none |\n| --- | ---: | ---: |")
        baseline = per_unit[workload, "none"]
        for name in configurations:
            value = per_unit[workload, name]
            print(f"| {name} | {value:,.0f} | {100 * (value / baseline - 1):+.2f}% |")
    if ("requests", "labels") in per_unit and ("requests", "sampling 512 KiB") in per_unit:
        ratio = per_unit["requests", "labels"] / per_unit["requests", "sampling 512 KiB"]
        print(f"\nlabels on, against off: {100 * (ratio - 1):+.2f}% instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
