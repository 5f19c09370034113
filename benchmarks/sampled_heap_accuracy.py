"""How close the sampled estimate of the leak comes to tracemalloc's exact figure, run by run.

    PYTHONPATH=. .venv/bin/python benchmarks/sampled_heap_accuracy.py [--runs 5] [--requests 5000]

Each run is a fresh process with an in-process leaky app (plain ASGI calls, no trace export): after
a warm-up, the sampler starts at the rate under test, then tracemalloc (8 frames) wraps it, so
both see the same allocations. Over N requests the leak is what grew in blocks allocated under
OpenTelemetry's proxy meter (a frame `opentelemetry.metrics._internal._Proxy*` among the first 8):
exactly, from tracemalloc's snapshots; estimated, from the sampled heap profiles' growth
(inuse_space, unsampled as pprof shows it). Printed: each run's estimate / exact, and per rate the
mean, standard deviation and range of that ratio, and the leak's samples per run.

tracemalloc also traces the raw domain (PyMem_RawMalloc), which the sampler does not hook: this
leak's locks keep their native semaphores there. A last run at rate 1 (every block recorded, on a
tenth of the requests) measures the share the sampler can see at all: the figure its estimates
should be compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
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

    def through_proxy(stack: tuple[tuple[str, int], ...]) -> bool:
        return any(function_of(*frame)[0].startswith(PROXY_METER) for frame in stack[:FRAMES])

    def exact(snapshot: tracemalloc.Snapshot) -> int:
        return sum(
            trace.size
            for trace in snapshot.traces
            if through_proxy(tuple((f.filename, f.lineno) for f in trace.traceback))
        )

    app = create_app(Settings(leak_mode="leaky", traces_exporter="none"))
    asyncio.run(drive(app, WARMUP_REQUESTS))
    sampling.start(rate=rate)
    tracemalloc.start(FRAMES)
    gc.collect()
    heap_before, traced_before = sampling.capture(), tracemalloc.take_snapshot()
    asyncio.run(drive(app, requests))
    gc.collect()
    heap_after, traced_after = sampling.capture(), tracemalloc.take_snapshot()
    growth = sampled_profile.delta(
        sampled_profile.unsampled(heap_after), sampled_profile.unsampled(heap_before)
    )
    estimate = sum(v[3] for (stack, _), v in growth.values.items() if through_proxy(stack))
    after = {(r.stack, r.size): r.inuse for r in heap_after.records}
    before = {(r.stack, r.size): r.inuse for r in heap_before.records}
    samples = sum(n - before.get(key, 0) for key, n in after.items() if through_proxy(key[0]))
    return {"exact": exact(traced_after) - exact(traced_before), "estimate": estimate,
            "samples": samples}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rates", type=int, nargs="+", default=[524288, 65536])
    parser.add_argument("--worker", type=int, metavar="RATE")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.requests)))
        return 0
    ratios: dict[int, list[float]] = {rate: [] for rate in args.rates}
    samples: dict[int, list[float]] = {rate: [] for rate in args.rates}
    for run in range(args.runs):
        for rate in args.rates:  # interleaved
            command = [sys.executable, __file__, "--worker", str(rate), "--requests",
                       str(args.requests)]  # fmt: skip
            result = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
            ratios[rate].append(result["estimate"] / result["exact"])
            samples[rate].append(result["samples"])
            print(f"run {run + 1}, rate {rate}: exact {result['exact']:.0f} B, estimate "
                  f"{result['estimate']:.0f} B, ratio {ratios[rate][-1]:.3f}, "
                  f"{result['samples']:.0f} samples", flush=True)  # fmt: skip
    print(f"\n| rate | leak over {args.requests} requests: estimate / exact, mean | std dev | "
          "lowest | highest | samples per run |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    command = [sys.executable, __file__, "--worker", "1", "--requests", str(args.requests // 10)]
    reference = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
    visible = reference["estimate"] / reference["exact"]
    print(f"rate 1 over {args.requests // 10} requests: the sampler sees {visible:.3f} of the "
          "leak's bytes that tracemalloc sees (the rest is in the raw domain)")  # fmt: skip
    for rate in args.rates:
        values = ratios[rate]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {rate} | {statistics.mean(values):.3f} | {spread:.3f} | {min(values):.3f} | "
              f"{max(values):.3f} | {statistics.mean(samples[rate]):.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
