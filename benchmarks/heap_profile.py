"""How fast /debug/pprof/heap builds a profile of 1,000,000 live traced blocks, side by side with
the floor (`tracemalloc.take_snapshot()` alone), how long the event loop stalls meanwhile, and how
big the profile is.

    .venv/bin/python benchmarks/heap_profile.py [--blocks 1000000] [--frames 16] [--rounds 3]

The heap is synthetic but not kind to us: blocks come from a few thousand distinct stacks, 8 to 24
frames deep, allocated in random order, so consecutive blocks rarely share a stack.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FUNCTIONS = 40


def write_allocating_module(directory: Path) -> None:
    """A module of functions that call each other along a given path and allocate at its end."""
    lines = ["def allocate(path, kind, size):", "    return call(path, 0, kind, size)", ""]
    lines += [
        "def call(path, depth, kind, size):",
        "    return FUNCS[path[depth]](path, depth + 1, kind, size)",
        "",
    ]
    for index in range(FUNCTIONS):
        lines += [
            f"def f{index}(path, depth, kind, size):",
            "    if depth < len(path):",
            "        return FUNCS[path[depth]](path, depth + 1, kind, size)",
            "    if kind == 0:",  # each kind is exactly one block
            "        return (None,) * size",
            "    if kind == 1:",
            "        return bytes(size)",
            "    return 'x' * size",
            "",
        ]
    lines.append(f"FUNCS = [{', '.join(f'f{i}' for i in range(FUNCTIONS))}]")
    (directory / "bench_allocations.py").write_text("\n".join(lines) + "\n")


def build_heap(blocks: int, seed: int = 1) -> list[object]:
    module = importlib.import_module("bench_allocations")
    rng = random.Random(seed)
    paths = [
        tuple(rng.randrange(FUNCTIONS) for _ in range(rng.randint(6, 22))) for _ in range(2000)
    ]
    kept: list[object] = []
    for _ in range(blocks):
        kept.append(module.allocate(rng.choice(paths), rng.randrange(3), rng.randint(1, 40)))
    return kept


async def get(app: object, path: str, query: bytes = b"") -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "root_path": "",
        "query_string": query,
        "headers": [],
    }
    answer: dict[str, object] = {}
    body = bytearray()

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            body.extend(message.get("body", b""))  # type: ignore[arg-type]

    await app(scope, receive, send)  # type: ignore[operator]
    return int(answer["status"]), bytes(body)  # type: ignore[call-overload]


async def with_stall_meter(coroutine: object) -> tuple[object, float, float]:
    """Run `coroutine` while a 1 ms ticker measures the longest gap between its ticks."""
    stop = asyncio.Event()
    longest = 0.0

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest = max(longest, now - last - 0.001)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    result = await coroutine  # type: ignore[misc]
    elapsed = time.perf_counter() - started
    stop.set()
    await tick
    return result, elapsed, longest


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from asgi_pprof import PprofApp

    directory = Path(tempfile.mkdtemp())
    write_allocating_module(directory)
    sys.path.insert(0, str(directory))
    app = PprofApp(frames=args.frames)

    tracemalloc.start(args.frames)
    heap = build_heap(args.blocks)
    gc.collect()
    live = len(tracemalloc._get_traces())
    print(f"live traced blocks: {live:,} ({len(heap):,} built here), frames: {args.frames}")

    floors, endpoints, stalls, floor_stalls = [], [], [], []
    size = 0
    for round_number in range(args.rounds):

        async def snapshot() -> None:
            await asyncio.sleep(0)
            tracemalloc.take_snapshot()

        _, floor, floor_stall = await with_stall_meter(snapshot())
        gc.collect()
        (status, body), endpoint, stall = await with_stall_meter(get(app, "/heap"))
        assert status == 200, body[:200]
        size = len(body)
        gc.collect()
        floors.append(floor)
        endpoints.append(endpoint)
        stalls.append(stall)
        floor_stalls.append(floor_stall)
        label = "cold (symbols)" if round_number == 0 else "warm"
        print(
            f"round {round_number + 1} [{label}]: take_snapshot {floor:.3f} s, endpoint "
            f"{endpoint:.3f} s, ratio {endpoint / floor:.2f}, longest loop stall {stall:.3f} s"
        )
    warm = slice(1, None) if args.rounds > 1 else slice(None)
    floor, endpoint = statistics.median(floors[warm]), statistics.median(endpoints[warm])
    print()
    print("| figure | value |")
    print("| --- | --- |")
    print(f"| live traced blocks | {live:,} |")
    print(f"| tracemalloc.take_snapshot() (floor), median warm | {floor:.3f} s |")
    print(f"| /debug/pprof/heap endpoint, median warm | {endpoint:.3f} s |")
    print(f"| ratio endpoint / floor (target <= 1.5) | {endpoint / floor:.2f} |")
    stall, floor_stall = statistics.median(stalls[warm]), statistics.median(floor_stalls[warm])
    print(f"| first profile (cold caches) | {endpoints[0]:.3f} s |")
    print(f"| longest event-loop stall during the endpoint, median warm | {stall:.3f} s |")
    print(f"| longest event-loop stall during take_snapshot() | {floor_stall:.3f} s |")
    print(f"| profile size (gzipped profile.proto) | {size:,} bytes |")


if __name__ == "__main__":
    asyncio.run(main())
