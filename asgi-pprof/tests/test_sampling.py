"""The sampling heap profiler itself: its statistics, its hooks, its names.

Allocations are made by functions of this file whose stacks the tests know; records are found by
their leaf function and block size. A `bytearray(n)` keeps its n bytes, plus one, in a block of
its own, apart from its 56-byte object; the lists that hold them are made at their full length
first, so that their growth does not share the blocks' size classes.
"""

from __future__ import annotations

import ctypes
import gc
import math
import sys
import tracemalloc
from collections.abc import Iterator

import pytest

from asgi_pprof import sampling
from asgi_pprof.sampling import SampledHeap, scale_heap_sample
from asgi_pprof.symbolize import _SourceFile

from sampler_helpers import allocate, py_mem_free, py_mem_malloc, records_of, require_sampler

_memprof = require_sampler()
PYMEM_DOMAIN_MEM = 1


@pytest.fixture(autouse=True)
def sampler_stopped() -> Iterator[None]:
    assert not tracemalloc.is_tracing(), "another test left tracemalloc on"
    sampling.stop()
    yield
    sampling.stop()
    tracemalloc.stop()


def allocate_small(count: int, size: int) -> list[bytearray | None]:
    return allocate(count, size)


def allocate_medium(count: int, size: int) -> list[bytearray | None]:
    return allocate(count, size)


def allocate_large(count: int, size: int) -> list[bytearray | None]:
    return allocate(count, size)


def test_a_rate_of_one_records_every_allocation_exactly() -> None:
    sampling.start(rate=1)
    blocks = allocate_medium(1000, 1000)
    del blocks[::2]
    heap = sampling.capture()
    assert records_of(heap, "allocate", 1001) == (1000, 500)
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
    for allocate_blocks, count, size in workload:
        blocks = allocate_blocks(count, size)
        kept.append(blocks[: count // 2])  # half stays in use
        del blocks
    heap = sampling.capture()
    for allocate_blocks, count, size in workload:
        block = size + 1
        allocs, inuse = records_of(heap, "allocate", block)
        for sampled, really in ((allocs, count), (inuse, count // 2)):
            estimate = scale_heap_sample(sampled, sampled * block, rate)[1]
            expected, tolerance = limit(really, block, rate)
            print(f"{allocate_blocks.__name__} rate {rate}: {estimate} for {expected}")
            assert abs(estimate - expected) <= tolerance


def test_the_inuse_counter_matches_the_records() -> None:
    """The /metrics gauge reads a counter the sampler keeps, not a capture: it agrees with what
    the records say is live, unsampled block by block."""
    rate = 4096
    sampling.start(rate=rate)
    keep = allocate_medium(2000, 3000)
    heap = sampling.capture()
    from_records = sum(
        scale_heap_sample(r.inuse, r.inuse_bytes, rate)[1] for r in heap.records if r.inuse
    )
    counter = sampling.estimated_inuse_bytes()
    assert counter > 2000 * 3001 * 0.5
    assert abs(counter - from_records) <= 0.02 * from_records + rate
    del keep
    sampling.stop()
    assert sampling.estimated_inuse_bytes() == 0


def mem_api() -> ctypes.PyDLL:
    api = ctypes.pythonapi  # calls with the GIL held, as the PyMem domain requires
    api.PyMem_Malloc.restype = api.PyMem_Calloc.restype = api.PyMem_Realloc.restype = (
        ctypes.c_void_p
    )
    api.PyMem_Malloc.argtypes = [ctypes.c_size_t]
    api.PyMem_Calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    api.PyMem_Realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    api.PyMem_Free.argtypes = [ctypes.c_void_p]
    api.PyMem_RawMalloc.restype = ctypes.c_void_p
    api.PyMem_RawMalloc.argtypes = [ctypes.c_size_t]
    api.PyMem_RawFree.argtypes = [ctypes.c_void_p]
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
    return records_of(heap, "test_realloc_and_calloc_edge_cases", size)


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
    for pointer in (shrunk, *empty, zeroed, from_null):
        api.PyMem_Free(pointer)
    api.PyMem_Free(None)
    heap = sampling.capture()
    assert sized(heap, 7000) == (1, 0)
    assert sized(heap, 6000) == (1, 0)


def raw_blocks(count: int, size: int) -> list[int]:
    api = mem_api()
    return [api.PyMem_RawMalloc(size) for _ in range(count)]


def test_the_raw_domain_is_sampled_and_large_objects_are_counted_once() -> None:
    """PyMem_RawMalloc (C libraries' buffers, every lock's semaphore) is sampled; and blocks
    that pymalloc hands to the raw domain (above 512 bytes) are counted once, not twice."""
    api = mem_api()
    sampling.start(rate=1)
    raw = raw_blocks(100, 777)
    objects = allocate_medium(100, 20_000)
    heap = sampling.capture()
    assert records_of(heap, "raw_blocks", 777) == (100, 100)
    assert records_of(heap, "allocate", 20_001) == (100, 100)
    assert sampling.stats()["delegated_above"] in (512, -1)  # -1: PYTHONMALLOC=malloc
    for pointer in raw:
        api.PyMem_RawFree(pointer)
    del objects
    heap = sampling.capture()
    assert records_of(heap, "raw_blocks", 777) == (100, 0)
    assert records_of(heap, "allocate", 20_001) == (100, 0)


def sampled_now() -> bool:
    """Whether the sampler (at rate 1) sees a new allocation here."""
    before = records_of(sampling.capture(), "allocate", 778)[0]
    keep = allocate_medium(1, 777)
    after = records_of(sampling.capture(), "allocate", 778)[0]
    del keep
    return after == before + 1


def test_tracemalloc_started_after_the_sampler_wraps_it_and_gives_it_back() -> None:
    sampling.start(rate=1)
    tracemalloc.start(1)
    assert sampled_now()
    traced = tracemalloc.get_traced_memory()[0]
    keep = allocate_medium(100, 10_000)
    assert tracemalloc.get_traced_memory()[0] > traced + 900_000
    tracemalloc.stop()  # restores the allocators it wrapped: the sampler's
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


def test_a_restart_at_another_rate_samples_at_the_new_rate_at_once() -> None:
    """Each thread keeps its own distance to the next sample; a restart redraws it, so that the
    first allocations after a restart at rate 1 are all seen."""
    sampling.start(rate=1 << 30)
    allocate_medium(10, 100)  # this thread's distance: about a GiB away
    sampling.stop()
    sampling.start(rate=1)
    keep = allocate_medium(10, 300)
    assert records_of(sampling.capture(), "allocate", 301) == (10, 10)
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
    assert sys.getrefcount(code) == references  # no record holds a code object
    # The tables are the same size on the last cycles as on the first of the same settings.
    assert max(own[-64:]) <= max(own[:64]) * 1.5


def recurse(depth: int, size: int) -> list[bytearray | None]:
    return recurse(depth - 1, size) if depth else allocate_medium(1, size)


def test_frames_are_cut_at_the_depth_asked_for_and_the_depth_has_a_maximum() -> None:
    sampling.start(rate=1, frames=5)
    keep = recurse(20, 4321)
    stacks = [r.stack for r in sampling.capture().records if r.size == 4322]
    assert stacks and all(len(stack) == 5 for stack in stacks)
    sampling.stop()
    with pytest.raises(ValueError, match="frames must be from 1 to 128"):
        sampling.start(frames=129)
    sampling.start(rate=1, frames=sampling.MAX_FRAMES)
    keep = recurse(300, 4323)  # deeper than any stack kept
    stacks = [r.stack for r in sampling.capture().records if r.size == 4324]
    assert stacks and all(len(stack) == sampling.MAX_FRAMES for stack in stacks)
    del keep


def test_the_profilers_own_work_is_not_sampled() -> None:
    sampling.start(rate=1)
    for _ in range(3):
        sampling.capture()
    own = sampling._own_files()
    assert any(name.endswith("sampling.py") for name in own)
    assert not any(name.endswith(("middleware.py", "labels.py")) for name in own)
    for record in sampling.capture().records:
        assert not any(location.filename in own for location in record.stack)


def comprehension_in_a_function() -> list[bytearray]:
    return [bytearray(5555) for _ in range(10)]


class Holder:
    def method(self) -> bytearray:
        return bytearray(5555)


def test_frames_are_named_as_the_tracemalloc_profile_names_them() -> None:
    sampling.start(rate=1)
    keep = [comprehension_in_a_function(), Holder().method()]
    leaves = {r.stack[0] for r in sampling.capture().records if r.size == 5556}
    names = {leaf.name for leaf in leaves}
    # The names kept by the sampler are those that reading the file gives tracemalloc's frames.
    assert names == {_SourceFile(leaf.filename).function_at(leaf.line)[0] for leaf in leaves}
    assert names == {
        "test_sampling.comprehension_in_a_function",  # not <listcomp>
        "test_sampling.Holder.method",
    }
    for leaf in leaves:
        assert leaf.function.start_line == _SourceFile(leaf.filename).function_at(leaf.line)[1]
    del keep


def test_bad_arguments_and_settings_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="rate"):
        sampling.start(rate=0)
    with pytest.raises(ValueError, match="frames"):
        sampling.start(frames=0)
    with pytest.raises(ValueError, match="max_bytes"):
        sampling.start(max_bytes=1000)
    with pytest.raises(ValueError, match="PPROF_MEM_PROFILE_RATE='fast'"):
        sampling.rate_from_environ({"PPROF_MEM_PROFILE_RATE": "fast"})
    with pytest.raises(ValueError, match="PPROF_MEM_PROFILE_MAX_BYTES='1k'.*262144 to"):
        sampling.max_bytes_from_environ({"PPROF_MEM_PROFILE_MAX_BYTES": "1k"})
    assert sampling.rate_from_environ({}) == 524288
    assert sampling.rate_from_environ({"PPROF_MEM_PROFILE_RATE": "65536"}) == 65536
    assert sampling.max_bytes_from_environ({}) == 4 << 20
    sampling.start()
    with pytest.raises(sampling.SamplingUnavailable, match="already running"):
        sampling.start()


def test_blocks_of_one_size_class_share_a_record_and_classes_are_close() -> None:
    """Records are keyed by size class, as Go's buckets are: sizes that differ within a class
    share a record (and its exact bytes); classes are at most 12.5% apart above 512 bytes."""
    sampling.start(rate=1)
    pointers = [py_mem_malloc(size) for size in (600, 620, 700, 100, 110)]
    records = [r for r in sampling.capture().records if r.stack[0].name.endswith("py_mem_malloc")]
    for pointer in pointers:
        py_mem_free(pointer)
    by_class = {r.size_class: (r.allocs, r.alloc_bytes) for r in records}
    # (Calling through ctypes allocates blocks of its own, up to 96 bytes, on every call.)
    assert by_class[sampling.size_class(600)] == (2, 1220)  # 576 < 600, 620 <= 640
    assert by_class[sampling.size_class(700)] == (1, 700)
    assert by_class[sampling.size_class(100)] == (2, 210)  # 16-byte steps: 97 to 112
    assert sampling.size_class(110) == sampling.size_class(100) != sampling.size_class(113)
    classes = [sampling.size_class(size) for size in range(1, 1 << 16)]
    assert classes == sorted(classes)
    for size in (513, 1000, 4097, 65_536, 1 << 30):
        low, high = 1, size  # bisect for the smallest size of size's class
        while low < high:
            middle = (low + high) // 2
            if sampling.size_class(middle) == sampling.size_class(size):
                high = middle
            else:
                low = middle + 1
        assert (size - low) / size < 0.125
    assert sampling.size_class(1 << 62) < 500  # bounded: at most a few hundred classes
