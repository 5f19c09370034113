"""How long merging the workers' heap profiles takes (PPROF_MULTIPROC_DIR), and its peak memory.

    PYTHONPATH=. .venv/bin/python benchmarks/multiproc_merge.py [--requests N] [--rate BYTES]

Realistic worker profiles: the leaky service runs in-process with the sampler at 2 KiB (more
records than at 512 KiB: a few thousand), and after each batch of requests its heap profile is
built as the endpoint builds it, 8 times, so that the 8 "workers" share their code's stacks and
differ in their values, as a service's workers do. Then what the answering worker does with 3 and
8 answers, `combine.combine` (decode each, renumber, label each sample with its pid, encode and
gzip), is timed 10 times (median and highest, CPU and wall time), and its peak Python memory is
measured by tracemalloc in a run of its own (tracemalloc slows it). Goal for 8 workers: under
1 s of CPU time, the margin that Parca's default scrape_timeout (its interval + 3 s) leaves
beyond a worker's own (a CPU profile's seconds + PPROF_MULTIPROC_TIMEOUT_SECONDS, 2), and under
32 MiB. The merge runs in a thread: the event loop still gets its turns meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import tracemalloc

import asgi_pprof
from app.main import create_app
from app.settings import Settings
from asgi_pprof import combine, sampled_profile, sampling
from asgi_pprof.asgi import Answer
from asgi_pprof.asgi import profile as profile_answer
from asgi_pprof.reader import read_profile
from tests.leak_probe import drive

WORKER_COUNTS = (3, 8)
GOAL_MS = 1000
GOAL_BYTES = 32 * 2**20


def worker_profiles(requests: int, rate: int) -> list[bytes]:
    asgi_pprof.start_sampling(rate=rate)
    app = create_app(Settings(leak_mode="leaky", traces_exporter="none"))
    profiles = []
    for _ in range(max(WORKER_COUNTS)):
        asyncio.run(drive(app, requests // max(WORKER_COUNTS)))
        profiles.append(sampled_profile.build(sampling.capture(), "heap"))
    asgi_pprof.stop_sampling()  # out of the measurements
    return profiles


def timed(answers: list[tuple[int, Answer]], times: int = 10) -> tuple[list[float], list[float]]:
    cpu, wall = [], []
    for _ in range(times):
        started, started_cpu = time.perf_counter(), time.thread_time()
        combine.combine(answers, [])
        cpu.append((time.thread_time() - started_cpu) * 1000)
        wall.append((time.perf_counter() - started) * 1000)
    return cpu, wall


def peak_bytes(answers: list[tuple[int, Answer]]) -> int:
    tracemalloc.start(1)
    try:
        combine.combine(answers, [])
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=16_000)
    parser.add_argument("--rate", type=int, default=2048)
    args = parser.parse_args()
    profiles = worker_profiles(args.requests, args.rate)
    records = [len(read_profile(data).samples) for data in profiles]
    print(
        f"8 worker heap profiles after {args.requests} leaky requests at {args.rate} B: "
        f"{min(records)}-{max(records)} samples, {min(map(len, profiles)) // 1024}-"
        f"{max(map(len, profiles)) // 1024} KiB gzipped each"
    )
    print("\n| workers | merged samples | merged KiB | CPU ms (median) | highest | "
          "wall ms (median) | highest | peak Python MiB |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    failed = False
    for count in WORKER_COUNTS:
        answers = [(1000 + n, profile_answer("heap", profiles[n])) for n in range(count)]
        merged = combine.combine(answers, [])
        samples = len(read_profile(merged.body).samples)
        cpu, wall = timed(answers)
        peak = peak_bytes(answers)
        print(f"| {count} | {samples} | {len(merged.body) // 1024} | {statistics.median(cpu):.0f} "
              f"| {max(cpu):.0f} | {statistics.median(wall):.0f} | {max(wall):.0f} "
              f"| {peak / 2**20:.1f} |")  # fmt: skip
        if count == max(WORKER_COUNTS):
            failed = statistics.median(cpu) > GOAL_MS or peak > GOAL_BYTES
    print(f"\ngoal for {max(WORKER_COUNTS)} workers: under {GOAL_MS} ms of CPU (median) and "
          f"{GOAL_BYTES // 2**20} MiB: {'MISSED' if failed else 'met'}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
