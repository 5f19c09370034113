"""The sampling heap profiler itself: its statistics, its hooks, and its safety.

Allocations are made by functions of this file whose stacks the tests know; records are found by
their leaf function and block size. A `bytearray(n)` keeps its n bytes, plus one, in a block of
its own, apart from its 56-byte object.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import sys
import threading
import tracemalloc
from collections.abc import Iterator

import pytest

from asgi_pprof import sampling
from asgi_pprof.sampling import SampledHeap, scale_heap_sample
from asgi_pprof.symbolize import function_of

if not sampling.available():
    if os.environ.get("CI") == "true":  # .ci/run builds the extension: it must be there
        pytest.fail(sampling.unavailable_reason(), pytrace=False)
    pytest.skip(sampling.unavailable_reason(), allow_module_level=True)

from asgi_pprof import _memprof  # noqa: E402  (only where it was built)

PYMEM_DOMAIN_MEM = 1


@pytest.fixture(autouse=True)
def sampler_stopped() -> Iterator[None]:
    assert not tracemalloc.is_tracing(), "another test left tracemalloc on"
    sampling.stop()
    yield
    sampling.stop()
    tracemalloc.stop()


def records_of(heap: SampledHeap, leaf: str, size: int) -> tuple[int, int]:
    """(allocated, in use) sampled blocks of `size + 1` bytes whose leaf function is `leaf`."""
    allocs = inuse = 0
    for record in heap.records:
        if record.stack and record.size == size + 1:
            if function_of(*record.stack[0])[0].endswith(leaf):
                allocs += record.allocs
                inuse += record.inuse
    return allocs, inuse


def allocate_small(count: int, size: int) -> list[bytearray]:
    return [bytearray(size) for _ in range(count)]


def allocate_medium(count: int, size: int) -> list[bytearray]:
    return [bytearray(size) for _ in range(count)]


def allocate_large(count: int, size: int) -> list[bytearray]:
    return [bytearray(size) for _ in range(count)]


def test_a_rate_of_one_records_every_allocation_exactly() -> None:
    sampling.start(rate=1)
    blocks = allocate_medium(1000, 1000)
    del blocks[::2]
    heap = sampling.capture()
    assert records_of(heap, "test_sampling.allocate_medium", 1000) == (1000, 500)
    assert heap.rate == 1
    assert scale_heap_sample(1000, 1001 * 1000, 1) == (1000, 1001 * 1000)  # not scaled


def limit(count: int, size: int, rate: int) -> tuple[float, float]:
    """The expected bytes of `count` blocks and 5 standard deviations of their estimate.

    Each block is sampled with probability p = 1 - exp(-size/rate), independently (the bytes
    between samples are exponential: memoryless); the estimate k/p blocks has variance
    count (1 - p) / p. One more block of slack for Go's truncation to whole numbers."""
    p = 1 - math.exp(-size / rate)
    sigma = size * math.sqrt(count * (1 - p) / p)
    return count * size, 5 * sigma + size


@pytest.mark.parametrize("rate", [4096, 65536])
def test_unsampled_estimates_fall_within_the_sampling_distribution(rate: int) -> None:
    workload = [  # (function, count, size): blocks sampled with p from 3% to ~100%
        (allocate_small, 40_000, 255),
        (allocate_medium, 4_000, 4095),
        (allocate_large, 400, 65535),
    ]
    sampling.start(rate=rate)
    kept = []
    for allocate, count, size in workload:
        blocks = allocate(count, size)
        kept.append(blocks[: count // 2])  # half stays in use
        del blocks
    heap = sampling.capture()
    for allocate, count, size in workload:
        allocs, inuse = records_of(heap, f"test_sampling.{allocate.__name__}", size)
        block = size + 1
        for sampled, really in ((allocs, count), (inuse, count // 2)):
            estimate = scale_heap_sample(sampled, sampled * block, rate)[1]
            expected, tolerance = limit(really, block, rate)
            print(f"{allocate.__name__} rate {rate}: {estimate} for {expected} (±{tolerance:.0f})")
            assert abs(estimate - expected) <= tolerance


def mem_api() -> ctypes.PyDLL:
    api = ctypes.pythonapi  # calls with the GIL held, as the PyMem domain requires
    api.PyMem_Malloc.restype = api.PyMem_Calloc.restype = api.PyMem_Realloc.restype = (
        ctypes.c_void_p
    )
    api.PyMem_Malloc.argtypes = [ctypes.c_size_t]
    api.PyMem_Calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    api.PyMem_Realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    api.PyMem_Free.argtypes = [ctypes.c_void_p]
    return api


class Allocator(ctypes.Structure):
    """PyMemAllocatorEx, its functions called with the GIL held (PYFUNCTYPE)."""

    _fields_ = [
        ("ctx", ctypes.c_void_p),
        ("malloc", ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)),
        (
            "calloc",
            ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t),
        ),
        (
            "realloc",
            ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t),
        ),
        ("free", ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)),
    ]


def current_allocator() -> Allocator:
    allocator = Allocator()
    ctypes.pythonapi.PyMem_GetAllocator(PYMEM_DOMAIN_MEM, ctypes.byref(allocator))
    return allocator


def sized(heap: SampledHeap, size: int) -> tuple[int, int]:
    return records_of(heap, "test_sampling.test_realloc_and_calloc_edge_cases", size - 1)


def test_realloc_and_calloc_edge_cases() -> None:
    api = mem_api()
    sampling.start(rate=1)
    block = api.PyMem_Malloc(3000)
    assert sized(sampling.capture(), 3000) == (1, 1)
    grown = api.PyMem_Realloc(block, 5000)  # the old block goes, the new one is allocated
    assert sized(sampling.capture(), 3000) == (1, 0)
    assert sized(sampling.capture(), 5000) == (1, 1)
    hook = current_allocator()
    assert hook.realloc(hook.ctx, grown, 1 << 62) is None  # failed: the block is still there
    assert sized(sampling.capture(), 5000) == (1, 1)
    assert hook.calloc(hook.ctx, 1 << 62, 8) is None  # nelem * elsize overflows
    assert hook.calloc(hook.ctx, 8, 1 << 62) is None
    shrunk = api.PyMem_Realloc(grown, 0)  # a block of nothing: not sampled, the old one freed
    assert shrunk
    assert sized(sampling.capture(), 5000) == (1, 0)
    empty = [api.PyMem_Malloc(0), api.PyMem_Calloc(0, 8), api.PyMem_Calloc(8, 0)]
    assert all(empty)
    zeroed = api.PyMem_Calloc(1000, 7)
    from_null = api.PyMem_Realloc(None, 6000)  # realloc(NULL, n) is malloc(n)
    heap = sampling.capture()
    assert sized(heap, 7000) == (1, 1)
    assert sized(heap, 6000) == (1, 1)
    assert not [r for r in heap.records if r.size == 0]
    for pointer in (shrunk, *empty, zeroed, from_null):
        api.PyMem_Free(pointer)
    api.PyMem_Free(None)
    heap = sampling.capture()
    assert sized(heap, 7000) == (1, 0)
    assert sized(heap, 6000) == (1, 0)


def sampled_now() -> bool:
    """Whether the sampler (at rate 1) sees a new allocation here."""
    before = records_of(sampling.capture(), "test_sampling.allocate_medium", 777)[0]
    keep = allocate_medium(1, 777)
    after = records_of(sampling.capture(), "test_sampling.allocate_medium", 777)[0]
    del keep
    return after == before + 1


def test_tracemalloc_started_after_the_sampler_wraps_it_and_gives_it_back() -> None:
    sampling.start(rate=1)
    tracemalloc.start(1)
    assert sampled_now()
    traced = tracemalloc.get_traced_memory()[0]
    keep = allocate_medium(100, 10_000)
    assert tracemalloc.get_traced_memory()[0] > traced + 900_000
    tracemalloc.stop()  # restores the allocator it wrapped: the sampler's
    assert sampled_now()
    assert sampling.is_running()
    sampling.stop()
    assert not _memprof.hooks_installed()  # it was on top again: unhooked
    del keep


def test_stopping_the_sampler_under_tracemalloc_leaves_tracemalloc_hooked() -> None:
    sampling.start(rate=1)
    tracemalloc.start(1)
    sampling.stop()  # tracemalloc wraps the sampler: its hooks stay, passing through
    assert not sampling.is_running()
    assert _memprof.hooks_installed()
    traced = tracemalloc.get_traced_memory()[0]
    keep = allocate_medium(100, 10_000)
    assert tracemalloc.get_traced_memory()[0] > traced + 900_000
    sampling.start(rate=1)  # still in tracemalloc's chain: it samples again
    assert sampled_now()
    sampling.stop()
    tracemalloc.stop()
    assert _memprof.hooks_installed()  # put back on top by tracemalloc, passing through
    sampling.start(rate=1)
    assert sampled_now()
    sampling.stop()
    assert not _memprof.hooks_installed()
    del keep


def test_the_sampler_refuses_to_start_under_a_running_tracemalloc() -> None:
    tracemalloc.start(1)
    with pytest.raises(sampling.SamplingUnavailable, match="tracemalloc is tracing"):
        sampling.start()
    assert not sampling.is_running()
    tracemalloc.stop()
    sampling.start()
    assert sampling.is_running()


def sample_counts(rounds: int) -> list[int]:
    counts = []
    for _ in range(rounds):
        before = _memprof.stats()["samples"]
        allocate_small(20_000, 255)
        counts.append(_memprof.stats()["samples"] - before)
    return counts


def test_a_forked_child_reseeds_and_restarts_its_totals() -> None:
    sampling.start(rate=4096)
    keep = allocate_medium(2000, 4095)
    parent_allocs = records_of(sampling.capture(), "test_sampling.allocate_medium", 4095)[0]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what it has allocated is what it has live; its own random draws
        status = 1
        try:
            allocs, inuse = records_of(sampling.capture(), "test_sampling.allocate_medium", 4095)
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


def test_stop_start_cycles_leak_nothing() -> None:
    code = allocate_medium.__code__
    references = sys.getrefcount(code)
    own = []
    for cycle in range(1000):
        sampling.start(rate=1 if cycle % 2 else 4096, frames=1 + cycle % 64)
        keep = allocate_medium(20, 5000)
        heap = sampling.capture()
        own.append(sampling.stats()["own_bytes"])
        sampling.stop()
        del keep, heap
        assert sampling.stats()["own_bytes"] == 0
    gc.collect()
    assert sys.getrefcount(code) == references  # every record gave its code objects back
    # The tables are the same size on the last cycles as on the first of the same settings.
    assert max(own[-64:]) <= max(own[:64]) * 1.5


def allocating_thread(number: int, rounds: int, kept: list[list[bytearray]]) -> None:
    size = 1000 + number  # a block size of its own, to find its records
    for _ in range(rounds):
        blocks = [bytearray(size) for _ in range(50)]
        kept.append(blocks[:5])
        del blocks


@pytest.mark.parametrize("rate", [1, 512])
def test_threads_allocating_concurrently_are_counted_exactly_at_rate_one(rate: int) -> None:
    sampling.start(rate=rate)
    kept: list[list[list[bytearray]]] = [[] for _ in range(8)]
    threads = [threading.Thread(target=allocating_thread, args=(n, 200, kept[n])) for n in range(8)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        sampling.capture()  # snapshots while they allocate
    for thread in threads:
        thread.join()
    heap = sampling.capture()
    for number in range(8):
        counts = records_of(heap, "test_sampling.allocating_thread", 1000 + number)
        if rate == 1:
            assert counts == (200 * 50, 200 * 5)
        else:
            assert 0 < counts[1] <= counts[0] <= 200 * 50
    assert sampling.stats()["dropped"] == 0


def test_frames_are_cut_at_the_depth_asked_for() -> None:
    def recurse(depth: int) -> list[bytearray]:
        return recurse(depth - 1) if depth else allocate_medium(1, 4321)

    sampling.start(rate=1, frames=5)
    keep = recurse(20)
    stacks = [
        r.stack for r in sampling.capture().records if r.size == 4322 and r.stack
    ]  # fmt: skip
    assert stacks and all(len(stack) == 5 for stack in stacks)
    del keep


def test_profilers_own_work_is_not_sampled() -> None:
    sampling.start(rate=1)
    for _ in range(3):
        sampling.capture()
    own = os.path.dirname(sampling.__file__) + os.sep
    assert not [r for r in sampling.capture().records if r.stack[0][0].startswith(own)]


def test_bad_arguments_and_settings_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="rate"):
        sampling.start(rate=0)
    with pytest.raises(ValueError, match="frames"):
        sampling.start(frames=0)
    with pytest.raises(ValueError, match="PPROF_MEM_PROFILE_RATE='fast'"):
        sampling.rate_from_environ({"PPROF_MEM_PROFILE_RATE": "fast"})
    assert sampling.rate_from_environ({}) == 524288
    assert sampling.rate_from_environ({"PPROF_MEM_PROFILE_RATE": "65536"}) == 65536
    sampling.start()
    with pytest.raises(sampling.SamplingUnavailable, match="already running"):
        sampling.start()
