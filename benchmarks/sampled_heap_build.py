"""How long a sampled heap profile takes to build, and what the sampler holds, after many requests.

    PYTHONPATH=. .venv/bin/python benchmarks/sampled_heap_build.py [--requests N] [--mode leaky]

An in-process app (plain ASGI calls, no trace export) serves N requests with the sampler at
512 KiB from startup; then heap and allocs profiles are built as the endpoints build them
(capture, unsample, encode), 20 times each: median and highest, in CPU time (the shared machine
inflates wall time) and wall time. Printed too: the sampler's own
C memory (its tables and filter), its records and live sampled blocks, and the Python memory that
building keeps (frame names, stacks, encoded locations: measured by tracemalloc wrapping the
sampler). Goals: a heap profile
in under 50 ms, the profiler's own memory under 2 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import tracemalloc

import asgi_pprof
from app.main import create_app
from app.settings import Settings
from asgi_pprof import sampled_profile, sampling
from tests.leak_probe import drive

BUILD_GOAL_MS = 50
MEMORY_GOAL_BYTES = 2 * 2**20


def build(name: str) -> bytes:
    return sampled_profile.build(sampling.capture(), name)


def timed(work: object, times: int = 20) -> tuple[list[float], list[float]]:
    """Milliseconds of CPU time (this thread's: what a busy machine inflates least) and of wall
    time, per call."""
    cpu, wall = [], []
    for _ in range(times):
        started, started_cpu = time.perf_counter(), time.thread_time()
        work()  # type: ignore[operator]
        cpu.append((time.thread_time() - started_cpu) * 1000)
        wall.append((time.perf_counter() - started) * 1000)
    return cpu, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--mode", choices=["leaky", "fixed"], default="leaky")
    parser.add_argument("--rate", type=int, default=524288)
    args = parser.parse_args()
    asgi_pprof.start_sampling(rate=args.rate)
    app = create_app(Settings(leak_mode=args.mode, traces_exporter="none"))
    started = time.monotonic()
    asyncio.run(drive(app, args.requests))
    print(f"{args.requests} {args.mode} requests in {time.monotonic() - started:.0f}s")
    tracemalloc.start(1)  # wraps the sampler: what the first build keeps in Python objects
    first = build("heap")
    kept_by_building = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    results = {
        "heap": timed(lambda: build("heap")),
        "allocs": timed(lambda: build("allocs")),
        "heap?debug=1": timed(lambda: sampled_profile.render_text(sampling.capture())),
        "capture only": timed(sampling.capture),
    }
    stats = sampling.stats()
    print(f"\n| after {args.requests} {args.mode} requests, {args.rate} B | CPU ms (median) | "
          "highest | wall ms (median) | highest |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (cpu, wall) in results.items():
        print(f"| build {name} | {statistics.median(cpu):.1f} | {max(cpu):.1f} | "
              f"{statistics.median(wall):.1f} | {max(wall):.1f} |")  # fmt: skip
    own = int(stats["own_bytes"])
    print(f"\nprofile: {len(first)} bytes gzipped; records {stats['records']}, live sampled "
          f"blocks {stats['live_blocks']}, samples {stats['samples']}")  # fmt: skip
    print(f"sampler's own C memory (tables and filter): {own / 2**20:.2f} MiB")
    print(f"Python memory kept by building (names, tables): {kept_by_building / 2**20:.2f} MiB")
    print(f"total: {(own + kept_by_building) / 2**20:.2f} MiB (goal < 2 MiB)")
    median_heap = statistics.median(results["heap"][0])
    print(f"heap profile built in {median_heap:.1f} ms of CPU (goal < {BUILD_GOAL_MS} ms)")
    return 0 if median_heap < BUILD_GOAL_MS and own + kept_by_building < MEMORY_GOAL_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
