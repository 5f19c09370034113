"""How long Python's full garbage collections stop the leaky service as its leak grows: why the
workshop's Prometheus scrapes every 2 s with a 2 s timeout, not every second.

    PYTHONPATH=. .venv/bin/python benchmarks/gc_pauses.py [--requests 200000]

The leaky app is called in-process (no server, no trace export, the sampling heap profiler on as
in the stack), one request after another; a `gc.callbacks` hook times every generation-2
collection, and the tracked objects are counted every tenth of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Sequence
from typing import Any

from app.main import create_app
from app.settings import Settings

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"leaker"), (b"user-agent", b"gc-pauses")],
    "client": ("127.0.0.1", 1),
    "server": ("127.0.0.1", 8080),
}


async def requests(app: Any, count: int) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    started = time.perf_counter()
    for number in range(1, count + 1):
        await app(dict(SCOPE), receive, send)
        if number % (count // 10) == 0:
            print(
                f"{number:>8} requests, {time.perf_counter() - started:5.0f} s: "
                f"{len(gc.get_objects()):>9,} tracked objects",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    arguments = parser.parse_args(argv)
    environ = {
        "LEAK_MODE": "leaky",
        "OTEL_TRACES_EXPORTER": "none",
        "PPROF_HEAP_PROFILER": "sampling",
    }
    app = create_app(Settings.from_environ(environ))
    pauses: list[tuple[float, int]] = []  # (seconds, tracked objects before it)
    began: list[tuple[float, int]] = []

    def timed(phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            objects = len(gc.get_objects())  # counted before the clock starts
            began.append((time.perf_counter(), objects))
        else:
            start, objects = began.pop()
            pauses.append((time.perf_counter() - start, objects))

    gc.callbacks.append(timed)
    asyncio.run(requests(app, arguments.requests))
    gc.callbacks.remove(timed)
    print("full collections (generation 2):")
    for seconds, objects in pauses:
        print(f"  {seconds:.3f} s over {objects:,} tracked objects")


if __name__ == "__main__":
    main()
