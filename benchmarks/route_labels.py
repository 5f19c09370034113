"""How well the route label attributes a leak in shared code to the route that leaks, run by run.

    PYTHONPATH=. .venv/bin/python benchmarks/route_labels.py [--runs 10] [--requests 3000]

The demo's second leak: `remember_visit`, a FastAPI dependency every route shares, keeps each
path's last visit in leaky mode, so `GET /orders/{n}` (n distinct) keeps an entry per request and
`GET /` one. Each run is two fresh processes with the same in-process requests, alternating `/`
and `/orders/{n}`: one measures the dependency's growth exactly (tracemalloc, 8 frames), the
other estimates it with the sampler (`--rate`, default 64 KiB: the leak is a few hundred bytes a
request) and labels on, split by the `http.route` label.
Printed per run: the estimate for `/orders/{order_id}` against the exact growth, and the share of
the dependency's estimated growth that the label gives to `/orders/{order_id}`; then the mean,
standard deviation and range of both.
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

LEAF = "remember_visit"


def worker(exact: bool, requests: int, rate: int) -> dict[str, float]:
    from app.main import create_app
    from app.settings import Settings
    from asgi_pprof import sampled_profile, sampling
    from asgi_pprof.reader import read_profile
    from asgi_pprof.symbolize import function_of
    from tests.leak_probe import get

    settings = Settings(leak_mode="leaky", traces_exporter="none")
    if not exact:
        settings = Settings(
            leak_mode="leaky",
            traces_exporter="none",
            heap_profiler="sampling",
            mem_profile_rate=rate,
        )
    app = create_app(settings)

    async def visit(first: int, count: int) -> None:
        for number in range(first, first + count):
            assert await get(app, f"/orders/{number}") == 200
            assert await get(app, "/") == 200

    asyncio.run(visit(0, 200))  # warm-up
    if exact:
        tracemalloc.start(8)
        gc.collect()
        before = tracemalloc.take_snapshot()
        asyncio.run(visit(200, requests))
        gc.collect()
        growth = tracemalloc.take_snapshot().compare_to(before, "traceback")
        total = sum(
            stat.size_diff
            for stat in growth
            if any(function_of(f.filename, f.lineno)[0].endswith(LEAF) for f in stat.traceback)
        )
        return {"exact": total}
    start = sampling.capture()
    asyncio.run(visit(200, requests))
    gc.collect()
    profile = read_profile(sampled_profile.build(sampling.capture(), "heap", start))
    by_route: dict[str, int] = {}
    for sample in profile.samples:
        if any(name.endswith(LEAF) for name, _, _ in sample.stack):
            route = sample.labels.get("http.route", "")
            by_route[route] = by_route.get(route, 0) + sample.values[profile.value_index()]
    return by_route


def measure(exact: bool, requests: int, rate: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", "exact" if exact else "estimate",
               "--requests", str(requests), "--rate", str(rate)]  # fmt: skip
    return json.loads(subprocess.run(command, capture_output=True, check=True).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rate", type=int, default=65536)
    parser.add_argument("--worker", choices=["exact", "estimate"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker == "exact", args.requests, args.rate)))
        return 0
    ratios, shares = [], []
    for run in range(args.runs):
        exact = measure(True, args.requests, args.rate)["exact"]
        by_route = measure(False, args.requests, args.rate)
        orders = by_route.get("/orders/{order_id}", 0)
        ratios.append(orders / exact)
        shares.append(orders / max(1, sum(by_route.values())))
        print(f"run {run + 1}: exact {exact:.0f} B, /orders/{{order_id}} {orders:.0f} B "
              f"({ratios[-1]:.3f}), its share of the labelled growth {shares[-1]:.3f}, "
              f"by route {by_route}", flush=True)  # fmt: skip
    for name, values in (("estimate / exact", ratios), ("share to /orders/{order_id}", shares)):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name}: mean {statistics.mean(values):.3f}, std dev {spread:.3f}, "
              f"{min(values):.3f} to {max(values):.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
