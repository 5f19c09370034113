"""The demo's second leak, and the label that finds it: a FastAPI dependency that every route
shares remembers each visit's headers by path in leaky mode (by route template when fixed), so
`/orders/{order_id}` leaks an entry per order while `/` does not; the leak's stack is the same
whichever route asked, and only the `http.route` label on its samples names the route.

In-process requests (tests/leak_probe.py's `get`), the sampler at 4 KiB, a fresh process per
mode: OpenTelemetry's proxy meter provider and the sampler are both the process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDERS = 1500
PROBE = """
import asyncio, json, sys
from asgi_pprof import sampled_profile, sampling
from asgi_pprof.reader import read_profile
from app.main import create_app
from app.settings import Settings
from tests.leak_probe import get

mode, orders = sys.argv[1], int(sys.argv[2])
app = create_app(Settings(leak_mode=mode, traces_exporter="none", heap_profiler="sampling",
                          mem_profile_rate=4096))

async def visit():
    for number in range(orders):
        assert await get(app, f"/orders/{number}") == 200
        assert await get(app, "/") == 200

asyncio.run(visit())
profile = read_profile(sampled_profile.build(sampling.capture(), "heap"))
by_route = {}
for sample in profile.samples:
    if any(name.endswith("remember_visit") for name, _, _ in sample.stack):
        route = sample.labels.get("http.route", "")
        by_route[route] = by_route.get(route, 0) + sample.values[profile.value_index()]
print(json.dumps(by_route))
"""


@pytest.fixture(scope="module")
def by_mode() -> dict[str, dict[str, int]]:
    results = {}
    for mode in ("leaky", "fixed"):
        env = {**os.environ, "LEAK_MODE": mode, "OTEL_TRACES_EXPORTER": "none"}
        run = subprocess.run(
            [sys.executable, "-c", PROBE, mode, str(ORDERS)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr
        results[mode] = json.loads(run.stdout.splitlines()[-1])
        print(mode, results[mode])
    return results


def test_the_second_leak_is_the_orders_route_and_only_its_label_says_so(
    by_mode: dict[str, dict[str, int]],
) -> None:
    leaky = by_mode["leaky"]
    orders, root = leaky.get("/orders/{order_id}", 0), leaky.get("/", 0)
    # A visit's headers are a dict of a few short strings: hundreds of bytes an order.
    assert orders > ORDERS * 200
    assert root < orders / 20  # `/` keeps one entry, whatever the count of visits


def test_fixed_mode_keeps_one_visit_a_route(by_mode: dict[str, dict[str, int]]) -> None:
    leaky, fixed = by_mode["leaky"], by_mode["fixed"]
    assert sum(fixed.values()) < sum(leaky.values()) / 20
