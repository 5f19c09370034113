"""How close the sampled estimate of the leak comes to the exact figures, run by run.

    PYTHONPATH=. .venv/bin/python benchmarks/sampled_heap_accuracy.py [--runs 10]
        [--requests 40000] [--rates 524288 65536] [--library DIR]

Every process builds an in-process leaky app (plain ASGI calls, no trace export) and sends it the
same deterministic requests. The leak is what grows, over `--requests` after a warm-up, in blocks
allocated under OpenTelemetry's proxy meter (a frame `opentelemetry.metrics._internal._Proxy*`
among the first 8). It is measured three ways, each in a process of its own (tracemalloc started
on top of the sampler would allocate its traces through the sampler's raw hook):

- exactly by tracemalloc (8 frames), once;
- exactly by the sampler at rate 1 (every block recorded, its tables allowed 1 GiB), once: the
  allocator's view of the same leak;
- estimated by the sampler at each rate under test, `--runs` times, interleaved: the sampled heap
  profiles' growth, unsampled as pprof shows it.

The two exact figures differ by design. When CPython reuses an object from a type's free list
(empty lists and dicts, tuples, floats...), no allocator call happens; CPython tells tracemalloc
alone (`_PyTraceMalloc_NewReference`), which moves the block to the reusing stack. An allocator
hook (the sampler, memray, ddtrace's memalloc) keeps it under the stack that first allocated it.
So "estimate / rate 1" is the sampling's own accuracy, and "estimate / tracemalloc" what a user
comparing with tracemalloc sees. The leak's samples per run say how noisy one run is.

`--library DIR` measures another build (a folder holding its asgi_pprof package).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tracemalloc

PROXY_METER = "opentelemetry.metrics._internal._Proxy"
FRAMES = 8
WARMUP_REQUESTS = 200
REFERENCE_TABLE_BYTES = 1 << 30


def worker(rate: int, requests: int) -> dict[str, float]:
    from app.main import create_app
    from app.settings import Settings
    from asgi_pprof import sampled_profile, sampling
    from asgi_pprof.symbolize import function_of
    from tests.leak_probe import drive

    names_of_frame: dict[object, str] = {}

    def name(frame: object) -> str:
        known = names_of_frame.get(frame)
        if known is None:
            known = getattr(frame, "name", None) or function_of(*frame)[0]  # type: ignore[misc]
            names_of_frame[frame] = known
        return known

    def through_proxy(stack: tuple[object, ...]) -> bool:
        return any(name(frame).startswith(PROXY_METER) for frame in stack[:FRAMES])

    def exact(snapshot: tracemalloc.Snapshot) -> int:
        return sum(
            trace.size
            for trace in snapshot.traces
            if through_proxy(tuple((f.filename, f.lineno) for f in trace.traceback))
        )

    def stack_of(growth: sampled_profile.SampledProfile, key: tuple) -> tuple[object, ...]:
        records = getattr(growth, "records", None)  # a build before records were keyed
        return records[key].stack if records is not None else key[0]

    def inuse(heap: sampling.SampledHeap) -> dict[object, int]:
        return {getattr(r, "key", (r.stack, getattr(r, "size", 0))): r.inuse for r in heap.records}

    app = create_app(Settings(leak_mode="leaky", traces_exporter="none"))
    asyncio.run(drive(app, WARMUP_REQUESTS))
    if rate == 0:  # the exact figure, from tracemalloc alone
        tracemalloc.start(FRAMES)
        gc.collect()
        traced_before = tracemalloc.take_snapshot()
        asyncio.run(drive(app, requests))
        gc.collect()
        return {"exact": exact(tracemalloc.take_snapshot()) - exact(traced_before)}
    if rate == 1:  # every block: tables large enough that none is turned away
        sampling.start(rate=1, max_bytes=REFERENCE_TABLE_BYTES)
    else:
        sampling.start(rate=rate)
    gc.collect()
    heap_before = sampling.capture()
    asyncio.run(drive(app, requests))
    gc.collect()
    heap_after = sampling.capture()
    growth = sampled_profile.delta(
        sampled_profile.unsampled(heap_after), sampled_profile.unsampled(heap_before)
    )
    estimate = sum(v[3] for key, v in growth.values.items() if through_proxy(stack_of(growth, key)))
    stacks = {
        getattr(r, "key", (r.stack, getattr(r, "size", 0))): r.stack for r in heap_after.records
    }
    after, before = inuse(heap_after), inuse(heap_before)
    samples = sum(n - before.get(key, 0) for key, n in after.items() if through_proxy(stacks[key]))
    turned_away = int(sampling.stats().get("table_full", 0))
    return {"estimate": estimate, "samples": samples, "table_full": turned_away}


def measure(rate: int, requests: int, env: dict[str, str]) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", str(rate), "--requests", str(requests)]
    return json.loads(subprocess.run(command, capture_output=True, check=True, env=env).stdout)


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} | {spread:.3f} | {min(values):.3f} | {max(values):.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--requests", type=int, default=40_000)
    parser.add_argument("--rates", type=int, nargs="+", default=[524288, 65536])
    parser.add_argument("--worker", type=int, metavar="RATE", help="0: tracemalloc's exact figure")
    parser.add_argument("--library", help="a folder holding another build's asgi_pprof package")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.library:
        env["PYTHONPATH"] = os.pathsep.join([args.library, env.get("PYTHONPATH", "")])
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.requests)))
        return 0
    traced = measure(0, args.requests, env)["exact"]
    every_block = measure(1, args.requests, env)
    if every_block["table_full"]:
        raise SystemExit(f"rate 1 turned {every_block['table_full']} blocks away: not exact")
    allocator = every_block["estimate"]
    print(f"the leak over {args.requests} requests: tracemalloc {traced:.0f} B; the sampler at "
          f"rate 1 {allocator:.0f} B, {allocator / traced:.3f} of it (objects reused from free "
          "lists stay under the stack that first allocated their block)", flush=True)  # fmt: skip
    by_allocator: dict[int, list[float]] = {rate: [] for rate in args.rates}
    by_tracemalloc: dict[int, list[float]] = {rate: [] for rate in args.rates}
    samples: dict[int, list[float]] = {rate: [] for rate in args.rates}
    for run in range(args.runs):
        for rate in args.rates:  # interleaved
            result = measure(rate, args.requests, env)
            by_allocator[rate].append(result["estimate"] / allocator)
            by_tracemalloc[rate].append(result["estimate"] / traced)
            samples[rate].append(result["samples"])
            print(f"run {run + 1}, rate {rate}: estimate {result['estimate']:.0f} B, "
                  f"{by_allocator[rate][-1]:.3f} of rate 1, {by_tracemalloc[rate][-1]:.3f} of "
                  f"tracemalloc, {result['samples']:.0f} samples", flush=True)  # fmt: skip
    print(
        "\n| rate | estimate / rate 1: mean | std dev | lowest | highest "
        "| estimate / tracemalloc: mean | std dev | lowest | highest | samples per run |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rate in args.rates:
        print(f"| {rate} | {summary(by_allocator[rate])} | {summary(by_tracemalloc[rate])} "
              f"| {statistics.mean(samples[rate]):.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
