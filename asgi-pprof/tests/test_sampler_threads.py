"""The sampler under threads and forks: many threads allocating and freeing while profiles are
built (on free-threaded builds too, without the GIL), and children forked at any moment.

The stress runs ASGI_PPROF_STRESS_SECONDS per rate (default 7: 21 s for the three rates; CI
asks 20). It asserts counts, never times: no record frees more than it allocated, and what the
records say is live is what the sampler follows.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
import sysconfig
import threading
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from asgi_pprof import sampled_profile, sampling
from asgi_pprof.sampling import SampledHeap

from sampler_helpers import allocate, records_of, require_sampler

_memprof = require_sampler()
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
STRESS_SECONDS = float(os.environ.get("ASGI_PPROF_STRESS_SECONDS", "7"))


@pytest.fixture(autouse=True)
def sampler_stopped() -> Iterator[None]:
    assert not tracemalloc.is_tracing(), "another test left tracemalloc on"
    sampling.stop()
    yield
    sampling.stop()


def test_importing_the_sampler_leaves_the_gil_off_on_free_threaded_builds() -> None:
    if not FREE_THREADED:
        pytest.skip("a build with the GIL")
    assert not sys._is_gil_enabled()  # type: ignore[attr-defined]
    sampling.start(rate=1)
    allocate(10, 100)
    assert not sys._is_gil_enabled()  # type: ignore[attr-defined]


def churn_bytes(draw: random.Random, kept: list[object]) -> None:
    kept.append(bytes(draw.randrange(1, 70_000)))


def churn_containers(draw: random.Random, kept: list[object]) -> None:
    kept.append([None] * draw.randrange(1, 2000))
    kept.append({number: None for number in range(draw.randrange(1, 200))})


def churn_growing(draw: random.Random, kept: list[object]) -> None:
    grown = bytearray()
    for _ in range(draw.randrange(1, 40)):
        grown += b"x" * draw.randrange(1, 5000)
    kept.append(grown)


def allocating_thread(seed: int, stop: threading.Event) -> None:
    draw = random.Random(seed)
    work = (churn_bytes, churn_containers, churn_growing)
    kept: list[object] = []
    while not stop.is_set():
        draw.choice(work)(draw, kept)
        if len(kept) > 200:
            del kept[: draw.randrange(1, 200)]  # some freed, some kept a while
    kept.clear()


def consistent(heap: SampledHeap) -> None:
    for record in heap.records:
        assert 0 <= record.frees <= record.allocs, record
        assert 0 <= record.free_bytes <= record.alloc_bytes, record
    assert sum(record.inuse for record in heap.records) == heap.stats["live_blocks"]


@pytest.mark.parametrize("rate", [1, 4096, 524288])
def test_threads_allocating_and_freeing_while_profiles_are_built(rate: int) -> None:
    sampling.start(rate=rate, max_bytes=2 << 20)
    stop = threading.Event()
    threads = [threading.Thread(target=allocating_thread, args=(n, stop)) for n in range(8)]
    for thread in threads:
        thread.start()
    builds = 0
    deadline = time.monotonic() + STRESS_SECONDS
    try:
        while time.monotonic() < deadline:
            heap = sampling.capture()
            consistent(heap)
            sampled_profile.build(heap, "heap")
            sampled_profile.render_text(heap)
            builds += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    heap = sampling.capture()
    consistent(heap)
    stats = heap.stats
    print(f"rate {rate}: {builds} profiles, {stats['samples']} samples, {stats['records']} records")
    assert stats["samples"] > 0 and builds > 0
    assert stats["own_bytes"] <= 2 << 20
    if rate == 1:  # every block those threads made is gone: the records say so exactly
        churned = [r for r in heap.records if r.stack[0].name.endswith("churn_bytes")]
        assert churned and all(r.inuse == 0 for r in churned if r.size > 100)


def capture_in_a_loop(stop: threading.Event) -> None:
    while not stop.is_set():
        sampling.capture()


def child_samples_its_main_thread() -> bool:
    """In a forked child: whether each of 50 marker allocations of its main thread is sampled."""
    before = records_of(sampling.capture(), "allocate", 3334)[0]
    keep = allocate(50, 3333)
    after = records_of(sampling.capture(), "allocate", 3334)[0]
    del keep
    return after - before == 50


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_children_forked_while_another_thread_captures_all_sample_their_main_thread() -> None:
    """The profiler's own-work state is per thread and the child resets its own: a fork in the
    middle of a capture elsewhere leaves the child's main thread sampled (29 of 30 were not)."""
    sampling.start(rate=1)
    stop = threading.Event()
    capturer = threading.Thread(target=capture_in_a_loop, args=(stop,))
    capturer.start()
    statuses = []
    try:
        for _ in range(30):
            pid = os.fork()
            if pid == 0:  # pragma: no cover (the child)
                os._exit(0 if child_samples_its_main_thread() else 1)
            statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    finally:
        stop.set()
        capturer.join()
    assert statuses == [0] * 30


def multiprocessing_child(results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    results.put(child_samples_its_main_thread())


def test_a_child_of_multiprocessings_fork_start_method_samples() -> None:
    sampling.start(rate=1)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    process = context.Process(target=multiprocessing_child, args=(results,))
    process.start()
    assert results.get(timeout=60) is True
    process.join(timeout=60)
    assert process.exitcode == 0


def sample_counts(rounds: int) -> list[int]:
    counts = []
    for _ in range(rounds):
        before = _memprof.stats()["samples"]
        allocate(20_000, 255)
        counts.append(_memprof.stats()["samples"] - before)
    return counts


def test_a_forked_child_reseeds_and_restarts_its_totals() -> None:
    sampling.start(rate=4096)
    keep = allocate(2000, 4095)
    parent_allocs = records_of(sampling.capture(), "allocate", 4096)[0]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child: what it allocated is what it has live)
        status = 1
        try:
            allocs, inuse = records_of(sampling.capture(), "allocate", 4096)
            os.write(write_end, repr((allocs, inuse, sample_counts(3))).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child_allocs, child_inuse, child_counts = eval(pipe.read())
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    parent_counts = sample_counts(3)
    assert parent_allocs > 0
    assert child_allocs == child_inuse == parent_allocs  # nothing was freed yet
    # Same allocations, other random draws: the same three counts of ~1,200 samples each would
    # come up by chance about once in 10^7 runs.
    assert child_counts != parent_counts
    del keep
