"""The service keeps answering while it is profiled in every way at once: a Prometheus scrape
(which reads the sampler's live-heap gauge), eight concurrent `heap?gc=1`, heap, allocs and
debug=1 builds, while a client requests `/` in a loop. Asserted: every request answered, every
profile answered. How long `/` waited at worst is measured by benchmarks/endpoint_stalls.py: a
time on a shared machine is not something a test can hold.
"""

from __future__ import annotations

import concurrent.futures
import threading
import urllib.request
from pathlib import Path

from tests.service import running_service

PROFILES = ["heap?gc=1"] * 8 + ["heap", "allocs", "heap?debug=1", "allocs?debug=1"]


def get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=120) as answer:
        answer.read()
        return answer.status


def test_the_service_answers_while_it_is_scraped_and_profiled_every_way(tmp_path: Path) -> None:
    env = {
        "LEAK_MODE": "leaky",
        "PPROF_HEAP_PROFILER": "sampling",
        "PPROF_MEM_PROFILE_RATE": "4096",
    }
    with running_service(env, tmp_path) as service:
        for _ in range(2000):  # a heap worth profiling: the leak's records
            get(service.url + "/")
        stop = threading.Event()
        answered: list[int] = []

        def requests_in_a_loop() -> None:
            while not stop.is_set():
                answered.append(get(service.url + "/"))

        client = threading.Thread(target=requests_in_a_loop)
        client.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(len(PROFILES) + 1) as pool:
                urls = [service.url + "/metrics"]
                urls += [f"{service.url}/debug/pprof/{path}" for path in PROFILES]
                statuses = list(pool.map(get, urls))
        finally:
            stop.set()
            client.join()
        assert statuses == [200] * len(urls)
        assert answered and set(answered) == {200}
        assert get(service.url + "/") == 200
