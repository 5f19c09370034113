"""What the sampler's tests share: the extension or a reason, allocations whose stacks and sizes
are known, and records found by leaf function and block size."""

from __future__ import annotations

import ctypes
import os
from types import ModuleType

import pytest

from asgi_pprof import sampling
from asgi_pprof.sampling import SampledHeap


def require_sampler() -> ModuleType:
    """The extension; the module is skipped where it cannot run, except under CI=true, where
    .ci/run builds it for every interpreter it tests: there its absence is a failure."""
    if not sampling.available():
        if os.environ.get("CI") == "true":
            pytest.fail(sampling.unavailable_reason(), pytrace=False)
        pytest.skip(sampling.unavailable_reason(), allow_module_level=True)
    from asgi_pprof import _memprof

    return _memprof


def allocate(count: int, size: int) -> list[bytearray | None]:
    """`count` blocks of `size + 1` bytes (bytearray keeps one more) allocated here, and nothing
    else of that size: their list is made elsewhere, at its full length."""
    blocks = _list_of(count)
    for index in range(count):
        blocks[index] = bytearray(size)
    return blocks


def _list_of(count: int) -> list[bytearray | None]:
    return [None] * count


_PyMem_Malloc = ctypes.pythonapi.PyMem_Malloc  # called with the GIL held, as PyMem wants
_PyMem_Malloc.restype, _PyMem_Malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
_PyMem_Free = ctypes.pythonapi.PyMem_Free
_PyMem_Free.argtypes = [ctypes.c_void_p]


def py_mem_malloc(size: int) -> int:
    """One PyMem_Malloc block of exactly `size` bytes, allocated in this function's frame (with
    nothing else above 32 bytes)."""
    return _PyMem_Malloc(size) or 0


def py_mem_free(pointer: int) -> None:
    _PyMem_Free(pointer)


def records_of(heap: SampledHeap, leaf: str, block: int) -> tuple[int, int]:
    """(allocated, in use) sampled blocks of `block` bytes whose leaf function ends with `leaf`:
    the records of that function and size class, whose blocks all have that size."""
    allocs = inuse = 0
    for record in heap.records:
        if record.size_class == sampling.size_class(block) and record.stack[0].name.endswith(leaf):
            assert record.alloc_bytes == record.allocs * block, record
            allocs += record.allocs
            inuse += record.inuse
    return allocs, inuse
