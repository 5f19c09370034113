"""How long the profiler holds the event loop: the longest wait of a 1 ms ticker while each
endpoint answers in-process, and the slowest `GET /` of the real service while it is scraped and
profiled every way at once.

    PYTHONPATH=. .venv/bin/python benchmarks/endpoint_stalls.py [--rounds 5]

Part 1, in-process (PprofApp called as ASGI, the sampler at 4 KiB after a leaky workload): per
endpoint, the median and highest of the rounds' longest ticker stall. Part 2, the service under
uvicorn (leaky, sampler at 4 KiB, 2,000 requests first): a client requests `/` in a loop while a
/metrics scrape, eight `heap?gc=1` and heap, allocs and debug=1 builds run at once; printed, the
slowest `/` of each round and the median, beside the slowest `/` without profiling. The goal:
no single step of the profiler holds the loop for more than about 10 ms. Exits 1 if the median
round's slowest `/` while profiled is over SLOWEST_ROOT_BOUND_SECONDS (500 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path

from app.main import create_app
from app.settings import Settings
from asgi_pprof import PprofApp, sampling
from tests.leak_probe import drive
from tests.service import running_service

ENDPOINTS = ["", "heap", "allocs", "heap?debug=1", "allocs?debug=1", "goroutine",
             "goroutine?debug=2", "cmdline", "heap?gc=1"]  # fmt: skip
PROFILES = ["heap?gc=1"] * 8 + ["heap", "allocs", "heap?debug=1", "allocs?debug=1"]


async def longest_stall(app: PprofApp, target: str, body: bytes = b"") -> float:
    path, _, query = target.partition("?")
    method = "POST" if body else "GET"
    scope = {"type": "http", "method": method, "path": "/" + path, "root_path": "",
             "query_string": query.encode(), "headers": []}  # fmt: skip
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        pass

    longest = 0.0

    async def tick() -> None:
        nonlocal longest
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            longest = max(longest, time.perf_counter() - before - 0.001)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    await app(scope, receive, send)
    ticker.cancel()
    return longest


def in_process(rounds: int) -> None:
    app = create_app(Settings(leak_mode="leaky", traces_exporter="none"))
    sampling.start(rate=4096)
    asyncio.run(drive(app, 3000))
    pprof = PprofApp()
    print("| endpoint (in-process, sampler at 4 KiB) | longest stall, median | highest |")
    print("| --- | ---: | ---: |")
    for target in ENDPOINTS:
        stalls = [asyncio.run(longest_stall(pprof, target)) for _ in range(rounds)]
        print(f"| {target or 'index'} | {statistics.median(stalls) * 1000:.1f} ms "
              f"| {max(stalls) * 1000:.1f} ms |", flush=True)  # fmt: skip
    sampling.stop()
    body = b"+".join(b"0x400000" for _ in range(110_000))[: 1 << 20]
    tracemalloc.start(8)
    stalls = [asyncio.run(longest_stall(pprof, "symbol", body)) for _ in range(rounds)]
    tracemalloc.stop()
    print(
        f"| symbol, 1 MB of addresses, tracing at 8 frames | "
        f"{statistics.median(stalls) * 1000:.1f} ms | {max(stalls) * 1000:.1f} ms |"
    )


def slowest_root(url: str, stop: threading.Event, slowest: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        with urllib.request.urlopen(url + "/", timeout=60) as answer:
            answer.read()
        slowest[0] = max(slowest[0], time.perf_counter() - started)


def get(url: str) -> None:
    with urllib.request.urlopen(url, timeout=120) as answer:
        answer.read()


# The bound this benchmark asserts (the test asserts only that GET / kept answering): the median
# round's slowest GET / while scraped and profiled every way at once: 108 ms measured at load
# average 3, 252 ms at 8 (quiet: 6 to 22 ms).
SLOWEST_ROOT_BOUND_SECONDS = 0.5


def beside_the_service(rounds: int) -> bool:
    env = {
        "LEAK_MODE": "leaky",
        "PPROF_HEAP_PROFILER": "sampling",
        "PPROF_MEM_PROFILE_RATE": "4096",
    }
    quiet, busy = [], []
    with tempfile.TemporaryDirectory() as folder, running_service(env, Path(folder)) as service:
        for _ in range(2000):
            get(service.url + "/")
        for _ in range(rounds):
            for profiled, results in ((False, quiet), (True, busy)):  # interleaved
                stop, slowest = threading.Event(), [0.0]
                client = threading.Thread(target=slowest_root, args=(service.url, stop, slowest))
                client.start()
                if profiled:
                    urls = [service.url + "/metrics"]
                    urls += [f"{service.url}/debug/pprof/{path}" for path in PROFILES]
                    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
                        list(pool.map(get, urls))
                else:
                    time.sleep(2)
                stop.set()
                client.join()
                results.append(slowest[0])
    print("\n| the service's slowest GET / | median of rounds | highest |")
    print("| --- | ---: | ---: |")
    for name, results in (("nothing else", quiet), ("scrape, 8 heap?gc=1, 4 builds", busy)):
        print(f"| {name} | {statistics.median(results) * 1000:.0f} ms "
              f"| {max(results) * 1000:.0f} ms |")  # fmt: skip
    held = statistics.median(busy)
    verdict = "within" if held <= SLOWEST_ROOT_BOUND_SECONDS else "OVER"
    print(f"\nslowest GET / while profiled: {held * 1000:.0f} ms median, {verdict} the bound of "
          f"{SLOWEST_ROOT_BOUND_SECONDS * 1000:.0f} ms")  # fmt: skip
    return held <= SLOWEST_ROOT_BOUND_SECONDS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    in_process(args.rounds)
    return 0 if beside_the_service(args.rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
