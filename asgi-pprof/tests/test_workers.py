"""PPROF_MULTIPROC_DIR: a service run by `uvicorn --workers 3` or by gunicorn with uvicorn's
worker answers its profiles for every live worker, merged, each sample labelled with its pid."""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from multi_worker import DEADLINE_SECONDS, Service, multi_worker_service
from pprof_decode import invariant_violations, samples

KINDS = ["uvicorn", "gunicorn"]
LEAK_MIB = 24  # 1 MiB blocks: each sampled, at 16 KiB


@pytest.fixture(scope="module", params=KINDS)
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with multi_worker_service(request.param, tmp_path_factory.mktemp(request.param)) as service:
        yield service


def leak_in_one_worker(service: Service, mib: int) -> int:
    """`mib` MiB kept by one worker (a keep-alive connection stays with it); its pid."""
    url = urlsplit(service.server.url)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    pids = set()
    try:
        for _ in range(mib):
            connection.request("GET", "/leak")
            answer = connection.getresponse()
            assert answer.status == 200
            pids.add(int(answer.read().split()[0]))
    finally:
        connection.close()
    assert len(pids) == 1, pids
    return pids.pop()


def leaked_by_pid(profile_samples: list, sample_type: str = "inuse_space") -> dict[int, int]:
    by_pid: dict[int, int] = {}
    for sample in profile_samples:
        if any(frame.function.endswith("leak_here") for frame in sample.frames):
            pid = int(sample.labels["pid"])
            by_pid[pid] = by_pid.get(pid, 0) + sample.values[sample_type]
    return by_pid


def test_heap_fetched_again_and_again_is_every_worker_merged(service: Service) -> None:
    workers = service.settled()
    for _ in range(8):  # new connections: each is taken by whichever worker the kernel picks
        heap = service.get("/debug/pprof/heap")
        assert heap.status == 200
        assert heap.merged() == workers
        assert "x-pprof-workers-failed" not in heap.headers
        assert heap.pids() == workers  # every worker has sampled something since it started
        profile = heap.profile()
        assert invariant_violations(profile) == []
        types = [profile.string_table[t.type] for t in profile.sample_type]
        assert types == ["alloc_objects", "alloc_space", "inuse_objects", "inuse_space"]


def test_a_leak_in_one_worker_is_attributed_to_its_pid(service: Service) -> None:
    workers = service.settled()
    before = leaked_by_pid(samples(service.get("/debug/pprof/heap").profile()))
    leaker = leak_in_one_worker(service, LEAK_MIB)
    assert leaker in workers
    after = leaked_by_pid(samples(service.get("/debug/pprof/heap").profile()))
    grown = {pid for pid in after if after[pid] != before.get(pid, 0)}
    assert grown == {leaker}, (before, after)
    assert after[leaker] - before.get(leaker, 0) >= (LEAK_MIB - 1) << 20  # 24 MiB, unsampled


def test_a_window_is_each_workers_growth_merged(service: Service) -> None:
    workers = service.settled()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        window = pool.submit(service.get, "/debug/pprof/heap?seconds=3")
        # Leaking before, through and after the window (each worker's opens when it is asked).
        leakers = set()
        while not window.done():
            leakers.add(leak_in_one_worker(service, 4))
            time.sleep(0.2)
        growth = window.result()
    assert growth.status == 200
    assert growth.merged() == workers
    profile = growth.profile()
    assert profile.duration_nanos >= 3_000_000_000
    leaked = leaked_by_pid(samples(profile))
    assert leaked and set(leaked) <= leakers, (leaked, leakers)


def test_a_cpu_profile_runs_in_every_worker(service: Service) -> None:
    workers = service.settled()
    cpu = service.get("/debug/pprof/profile?seconds=1")
    assert cpu.status == 200, cpu.body
    assert cpu.merged() == workers  # the peers' ran in their main thread: no 501
    profile = cpu.profile()
    assert [profile.string_table[t.type] for t in profile.sample_type] == ["samples", "cpu"]
    assert profile.duration_nanos >= 1_000_000_000


def profiling(service: Service) -> set[int]:
    """The workers taking a CPU profile now: those with a task in cpu.profile_for."""
    text = service.get("/debug/pprof/goroutine?debug=1").body.decode()
    sections = text.split("# pid ")[1:]
    return {int(section.split()[0]) for section in sections if ".profile_for" in section}


def test_a_profile_whose_client_has_gone_stops_in_every_worker(service: Service) -> None:
    workers = service.settled()
    url = urlsplit(service.server.url)
    abandoned = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    abandoned.request("GET", "/debug/pprof/profile?seconds=300")
    deadline = time.monotonic() + DEADLINE_SECONDS
    while profiling(service) != workers:
        assert time.monotonic() < deadline, service.server.log()
        time.sleep(0.1)
    abandoned.close()
    # Far sooner than its 300 s: every worker stopped it when the client left.
    while profiling(service):
        assert time.monotonic() < deadline, service.server.log()
        time.sleep(0.1)
    cpu = service.get("/debug/pprof/profile?seconds=1")
    assert cpu.status == 200 and cpu.merged() == workers


def test_texts_come_one_worker_after_the_other(service: Service) -> None:
    workers = service.settled()
    text = service.get("/debug/pprof/goroutine?debug=1").body.decode()
    headed = {int(line.split()[2]) for line in text.splitlines() if line.startswith("# pid ")}
    assert headed == workers
    assert text.count("goroutine profile: total") == len(workers)


def test_a_killed_worker_is_replaced_and_the_profile_still_answers(service: Service) -> None:
    workers = service.settled()
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + DEADLINE_SECONDS
    while victim in service.workers() or len(service.workers()) < len(workers):
        assert time.monotonic() < deadline, service.server.log()
        time.sleep(0.1)
    replaced = service.settled()  # the victim's socket is gone too
    assert victim not in replaced and len(replaced - workers) == 1
    heap = service.get("/debug/pprof/heap")
    assert heap.status == 200
    assert heap.merged() == replaced == heap.pids()
    assert service.sockets() == {f"{pid}.sock" for pid in replaced}


@pytest.mark.parametrize("kind", KINDS)
def test_a_worker_that_does_not_answer_is_named(kind: str, tmp_path: Path) -> None:
    with multi_worker_service(kind, tmp_path, timeout_seconds=3) as service:
        workers = service.settled()
        stopped = max(workers)
        os.kill(stopped, signal.SIGSTOP)  # it accepts nothing: others take the HTTP requests
        try:
            heap = service.get("/debug/pprof/heap")
            text = service.get("/debug/pprof/goroutine?debug=2").body.decode()
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert heap.status == 200
        failed = heap.headers.get("x-pprof-workers-failed", "")
        assert f"{stopped}: did not answer in 3 s" in failed, heap.headers
        assert stopped not in heap.pids() and heap.pids() <= workers
        comments = [heap.profile().string_table[i] for i in heap.profile().comment]
        assert any(c.startswith(f"worker {stopped} is missing: did not answer") for c in comments)
        assert f"# pid {stopped}: no answer: did not answer in 3 s" in text


def test_the_index_names_the_workers_that_answer_together(service: Service) -> None:
    workers = service.settled()
    page = service.get("/debug/pprof/").body.decode()
    assert "(PPROF_MULTIPROC_DIR), merged" in page
    listed = page.split("labelled with its pid: ", 1)[1].split(".", 1)[0]
    assert {int(pid) for pid in listed.split()} == workers
