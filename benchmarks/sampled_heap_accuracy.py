"""How close the sampled estimate of the leak comes to tracemalloc's exact figure, run by run.

    PYTHONPATH=. .venv/bin/python benchmarks/sampled_heap_accuracy.py [--runs 10] [--requests 5000]
        [--library DIR]

Each run is two fresh processes with an in-process leaky app (plain ASGI calls, no trace export),
the same deterministic requests: in one, tracemalloc (8 frames) measures the leak exactly; in the
other, the sampler at the rate under test estimates it. (Not both in one process: tracemalloc
keeps its traces in memory it asks of the raw allocator it wraps, the sampler's, which would count
them as the program's.) Over N requests after a warm-up, the leak is what grew in blocks
allocated under OpenTelemetry's proxy meter (a frame `opentelemetry.metrics._internal._Proxy*`
among the first 8): exactly, from tracemalloc's snapshots; estimated, from the sampled heap
profiles' growth (inuse_space, unsampled as pprof shows it). Printed: each run's estimate /
exact, and per rate the mean, standard deviation and range of that ratio, and the leak's samples
per run.

tracemalloc also traces the raw domain (PyMem_RawMalloc), where this leak's locks keep their
native semaphores; the sampler hooks it too (a sampler built before it did can be measured with
`--library DIR`, a folder holding that build's asgi_pprof package). A last run at rate 1 (every
block recorded, on a tenth of the requests) measures the share the sampler sees at all.
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


def worker(rate: int, requests: int) -> dict[str, float]:
    from app.main import create_app
    from app.settings import Settings
    from asgi_pprof import sampled_profile, sampling
    from asgi_pprof.symbolize import function_of
    from tests.leak_probe import drive

    def names(stack: tuple[object, ...]) -> list[str]:
        """Function names of a stack: the sampler's locations, or (file, line) frames."""
        return [
            getattr(frame, "name", None) or function_of(*frame)[0]  # type: ignore[misc]
            for frame in stack[:FRAMES]
        ]

    def through_proxy(stack: tuple[object, ...]) -> bool:
        return any(name.startswith(PROXY_METER) for name in names(stack))

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
    return {"estimate": estimate, "samples": samples}


def measure(rate: int, requests: int, env: dict[str, str]) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", str(rate), "--requests", str(requests)]
    return json.loads(subprocess.run(command, capture_output=True, check=True, env=env).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--requests", type=int, default=5000)
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
    ratios: dict[int, list[float]] = {rate: [] for rate in args.rates}
    samples: dict[int, list[float]] = {rate: [] for rate in args.rates}
    for run in range(args.runs):
        exact = measure(0, args.requests, env)["exact"]
        for rate in args.rates:  # interleaved
            result = measure(rate, args.requests, env)
            ratios[rate].append(result["estimate"] / exact)
            samples[rate].append(result["samples"])
            print(f"run {run + 1}, rate {rate}: exact {exact:.0f} B, estimate "
                  f"{result['estimate']:.0f} B, ratio {ratios[rate][-1]:.3f}, "
                  f"{result['samples']:.0f} samples", flush=True)  # fmt: skip
    print(f"\n| rate | leak over {args.requests} requests: estimate / exact, mean | std dev | "
          "lowest | highest | samples per run |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    few = args.requests // 10
    visible = measure(1, few, env)["estimate"] / measure(0, few, env)["exact"]
    print(f"rate 1 over {few} requests: the sampler sees {visible:.3f} of the leak's bytes that "
          "tracemalloc sees")  # fmt: skip
    for rate in args.rates:
        values = ratios[rate]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {rate} | {statistics.mean(values):.3f} | {spread:.3f} | {min(values):.3f} | "
              f"{max(values):.3f} | {statistics.mean(samples[rate]):.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
