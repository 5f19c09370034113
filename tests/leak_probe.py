"""Measure what one leak mode retains per request, in-process; prints one JSON object.

Run as `python -m tests.leak_probe MODE` from the project root, one fresh process per mode:
OpenTelemetry's global proxy meter provider lives for the whole process, so a second app built
in the same process would start from the first one's meters.

tracemalloc starts after the warm-up, so everything it still traces at the end is memory that
the measured requests allocated and kept. Requests are plain ASGI calls rather than an HTTP client:
httpx's ASGITransport retries a failing `import sniffio` on every request, which is slow under
tracemalloc and leaves allocations of its own in the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tracemalloc

from opentelemetry.metrics._internal import _PROXY_METER_PROVIDER
from starlette.types import ASGIApp, Message, Scope

from app.main import create_app
from app.settings import Settings

# Deep enough to reach app/main.py from an allocation inside OpenTelemetry (4 frames today);
# every extra frame makes each traced allocation slower.
TRACEBACK_FRAMES = 8


def proxy_meter_count() -> int:
    """Meters OpenTelemetry's global proxy provider holds on to (it never lets one go)."""
    return len(_PROXY_METER_PROVIDER._meters)


async def get(app: ASGIApp, path: str) -> int:
    """One GET request through the ASGI app; returns the response status."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"leaker")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


async def drive(app: ASGIApp, requests: int) -> None:
    for _ in range(requests):
        status = await get(app, "/")
        if status != 200:
            raise RuntimeError(f"GET / answered {status}")


async def measure(mode: str, warmup: int, requests: int) -> dict[str, object]:
    app = create_app(Settings(leak_mode=mode, traces_exporter="none"))
    await drive(app, warmup)
    gc.collect()
    meters_before = proxy_meter_count()
    tracemalloc.start(TRACEBACK_FRAMES)
    traced_before, _ = tracemalloc.get_traced_memory()
    await drive(app, requests)
    gc.collect()
    traced_after, _ = tracemalloc.get_traced_memory()
    meters_after = proxy_meter_count()
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()

    largest = snapshot.statistics("traceback")[0]
    return {
        "mode": mode,
        "requests": requests,
        "retained_bytes": traced_after - traced_before,
        "proxy_meters_before": meters_before,
        "proxy_meters_after": meters_after,
        "largest_group_bytes": largest.size,
        "largest_group_blocks": largest.count,
        # Most recent call first, as "path:line".
        "largest_group_traceback": [
            f"{frame.filename}:{frame.lineno}" for frame in reversed(largest.traceback)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["leaky", "fixed"])
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2000)
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(measure(arguments.mode, arguments.warmup, arguments.requests))))


if __name__ == "__main__":
    main()
