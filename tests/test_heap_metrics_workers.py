"""python_heap_inuse_bytes in prometheus_client's multiprocess mode: the service run by
`uvicorn --workers 2` answers /metrics for every live worker, one series per pid, and a worker
that is killed and replaced leaves no series and no file behind."""

from __future__ import annotations

import http.client
import os
import re
import signal
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from app.heap_metrics import HEAP_INUSE_METRIC
from tests.service import Service, running_service

WORKERS = 2
DEADLINE_SECONDS = 120.0
LEAKY_REQUESTS = 2000  # each keeps a meter and its instruments: kilobytes


def worker_pids(service: Service) -> set[int]:
    """uvicorn's worker processes: its children started by multiprocessing's spawn."""
    pids = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                state, parent = stat.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                spawned = b"spawn_main" in cmdline.read()
        except OSError:
            continue
        if int(parent) == service.process.pid and spawned and state != "Z":
            pids.add(int(entry))
    return pids


def gauge_by_pid(service: Service) -> dict[int, float]:
    with urllib.request.urlopen(service.url + "/metrics", timeout=30) as answer:
        metrics = answer.read().decode()
    pattern = rf'^{HEAP_INUSE_METRIC}{{pid="(\d+)"}} (\S+)$'
    return {int(pid): float(value) for pid, value in re.findall(pattern, metrics, re.M)}


def leak_in_one_worker(service: Service, requests: int) -> None:
    """`requests` on one keep-alive connection: one worker answers them all."""
    url = urlsplit(service.url)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        for _ in range(requests):
            connection.request("GET", "/")
            assert connection.getresponse().read() == b"OK\n"
    finally:
        connection.close()


def grown(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    return {pid: value - before.get(pid, 0.0) for pid, value in after.items()}


def wait_for(condition, service: Service) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never came true:\n{service.log()}")
        time.sleep(0.2)


def test_every_live_worker_has_its_series_and_an_exited_one_none(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {"PPROF_HEAP_PROFILER": "sampling", "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    options = ["--workers", str(WORKERS)]
    with running_service(env, tmp_path, uvicorn_options=options) as service:
        wait_for(lambda: len(worker_pids(service)) == WORKERS, service)
        workers = worker_pids(service)
        # Whichever worker answers /metrics, every worker's value is there...
        wait_for(lambda: set(gauge_by_pid(service)) == workers, service)
        for _ in range(6):
            assert set(gauge_by_pid(service)) == workers
        # ...and kept current: the leak (LEAK_MODE=leaky) of one worker's requests shows.
        before = gauge_by_pid(service)
        leak_in_one_worker(service, LEAKY_REQUESTS)
        wait_for(lambda: max(grown(before, gauge_by_pid(service)).values()) > 2**20, service)

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(service) - workers) == 1, service)
        replaced = worker_pids(service)
        assert victim not in replaced
        wait_for(lambda: set(gauge_by_pid(service)) == replaced, service)
        assert not list(directory.glob(f"gauge_live*_{victim}.db"))


def test_a_bad_multiproc_directory_stops_the_service_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    env = {"PPROF_HEAP_PROFILER": "sampling", "PROMETHEUS_MULTIPROC_DIR": str(missing)}
    with pytest.raises(RuntimeError, match=f"PROMETHEUS_MULTIPROC_DIR='{missing}'"):
        with running_service(env, tmp_path, startup_timeout=60):
            pass
