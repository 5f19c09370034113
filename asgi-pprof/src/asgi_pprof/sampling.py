"""The sampling heap profiler: Go's runtime.MemProfile for Python, always on and nearly free.

The C extension `_memprof` hooks Python's three allocator domains and records one allocation every
`rate` bytes on average (Go's runtime.MemProfileRate, default 512 KiB), with its stack, and
follows the sampled blocks until they are freed. Records are keyed by stack and block size class,
as Go's buckets are, and everything the sampler holds is bounded (`max_bytes`). This module starts
and stops it and reads its records (`capture`), named by `sampled_stacks`; `sampled_profile`
writes them as Go writes `heap` and `allocs`.

What it does not see: memory that C code takes from malloc itself (not through PyMem), the
interpreter's arenas, and anything allocated before it started. Samples of the profiler's own work
(building a profile, answering an endpoint) are left out by the sampler itself.

Where the extension cannot run (not built, or an interpreter it does not support), `start` raises
SamplingUnavailable with the reason, and the tracemalloc profile works as before.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import os
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

from asgi_pprof import labels
from asgi_pprof.sampled_stacks import Location, SampledStacks, Stack

try:
    from asgi_pprof import _memprof
except ImportError as error:  # not built, or an interpreter it does not support
    _memprof = None
    _UNAVAILABLE_REASON = "the sampling heap profiler is not available: " + (
        str(error)
        if importlib.util.find_spec("asgi_pprof._memprof") is not None
        else "its C extension asgi_pprof._memprof is not installed (pip builds it where a C "
        "compiler and Python's headers are found; without them the library installs without it)"
    )
else:
    _UNAVAILABLE_REASON = ""

DEFAULT_RATE = 524288  # Go's runtime.MemProfileRate: one sample per 512 KiB allocated
DEFAULT_FRAMES = 64
MAX_FRAMES = 128  # as Go keeps since 1.23
DEFAULT_MAX_BYTES = 4 << 20
MIN_MAX_BYTES = 256 << 10
RATE_VARIABLE = "PPROF_MEM_PROFILE_RATE"
MAX_BYTES_VARIABLE = "PPROF_MEM_PROFILE_MAX_BYTES"
MAX_RATE = 1 << 40
MAX_MAX_BYTES = 1 << 34

# The code that passes a service's requests through: not the profiler's own work.
_PASSED_THROUGH = frozenset({"middleware.py", "labels.py"})
_RECORD_ROW = struct.Struct("<IIIIQQQQQ")  # as _memprof.c's record_row_t


class SamplingUnavailable(RuntimeError):
    """The sampling heap profiler cannot run in this interpreter, or cannot start now."""


class Record(NamedTuple):
    """One stack, block size class, label set and thread: Go's MemProfileRecord, in sampled
    blocks and their requested bytes. (A tuple: a capture makes thousands.)"""

    stack: Stack
    stack_id: int
    size_class: int
    label: int  # a label set's number (see labels), 0 for none
    thread: int  # the allocating thread's ident, where threads are recorded; else 0
    allocs: int  # sampled blocks allocated since start
    frees: int  # ... and freed since
    alloc_bytes: int
    free_bytes: int

    @property
    def inuse(self) -> int:
        return self.allocs - self.frees

    @property
    def inuse_bytes(self) -> int:
        return self.alloc_bytes - self.free_bytes

    @property
    def size(self) -> int:
        """The average block size, as Go's writeHeapProto labels a record (`bytes`)."""
        return self.alloc_bytes // self.allocs if self.allocs else 0

    @property
    def key(self) -> tuple[int, int, int, int]:
        """What tells records apart while the sampler runs."""
        return self.stack_id, self.size_class, self.label, self.thread


@dataclass
class SampledHeap:
    """The sampler's records at one moment."""

    records: list[Record]
    rate: int
    frames: int
    stats: dict[str, int | bool] = field(default_factory=dict)
    time_ns: int = field(default_factory=time.time_ns)


def available() -> bool:
    """Whether the extension is here and this interpreter is one it supports."""
    return _memprof is not None


def unavailable_reason() -> str:
    """Why `available()` is false; empty when it is true."""
    return _UNAVAILABLE_REASON


def _whole_number(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = environ.get(name, "").strip()
    if not value:
        return default
    if not (value.isascii() and value.isdigit() and len(value) <= 19) or not (
        low <= int(value) <= high
    ):
        raise ValueError(f"{name}={value!r} is not allowed; use an integer from {low} to {high}")
    return int(value)


def rate_from_environ(environ: Mapping[str, str] = os.environ) -> int:
    """PPROF_MEM_PROFILE_RATE, or Go's default of 524,288 bytes; ValueError if it is not a
    whole number of bytes from 1 to 2**40."""
    return _whole_number(environ, RATE_VARIABLE, DEFAULT_RATE, 1, MAX_RATE)


def max_bytes_from_environ(environ: Mapping[str, str] = os.environ) -> int:
    """PPROF_MEM_PROFILE_MAX_BYTES, the bound on the sampler's own memory, or 4 MiB; ValueError
    if it is not a whole number of bytes from 262,144 to 2**34."""
    return _whole_number(
        environ, MAX_BYTES_VARIABLE, DEFAULT_MAX_BYTES, MIN_MAX_BYTES, MAX_MAX_BYTES
    )


def _own_files() -> list[str]:
    """The profiler's source files: a sample whose stack runs through one is its own work."""
    folder = os.path.dirname(os.path.abspath(__file__))
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and n not in _PASSED_THROUGH)
    return [os.path.join(os.path.dirname(__file__), name) for name in names]


def start(
    rate: int | None = None,
    frames: int = DEFAULT_FRAMES,
    max_bytes: int | None = None,
    threads: bool = True,
) -> None:
    """Sample one allocation per `rate` bytes on average (default: PPROF_MEM_PROFILE_RATE, else
    524,288; 1 records every allocation), keeping up to `frames` frames of each stack (at most
    128) and at most `max_bytes` of tables (default: PPROF_MEM_PROFILE_MAX_BYTES, else 4 MiB).
    Each sample carries the labels set where it was allocated (see labels) and, with `threads`,
    its thread.

    Start it before tracemalloc, if both are wanted: tracemalloc started after it wraps it, and
    puts it back when it stops; a sampler started after tracemalloc would be unhooked silently by
    tracemalloc.stop(), so that is refused. SamplingUnavailable says why it cannot start.
    """
    if _memprof is None:
        raise SamplingUnavailable(_UNAVAILABLE_REASON)
    if rate is None:
        rate = rate_from_environ()
    if max_bytes is None:
        max_bytes = max_bytes_from_environ()
    if not 1 <= rate <= MAX_RATE:
        raise ValueError(f"rate must be from 1 to {MAX_RATE} bytes, not {rate}")
    if not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be from 1 to {MAX_FRAMES}, not {frames}")
    if not MIN_MAX_BYTES <= max_bytes <= MAX_MAX_BYTES:
        raise ValueError(
            f"max_bytes must be from {MIN_MAX_BYTES} to {MAX_MAX_BYTES}, not {max_bytes}"
        )
    if tracemalloc.is_tracing() and not _memprof.hooks_installed():
        raise SamplingUnavailable(
            "tracemalloc is tracing: start the sampling heap profiler before tracemalloc, or "
            "stop tracemalloc first (its stop() would silently unhook a sampler started after it)"
        )
    with _lock:
        _memprof.set_own_files(_own_files())
        try:
            _memprof.start(rate, frames, max_bytes, threads, labels.label_set_number)
        except RuntimeError as error:
            raise SamplingUnavailable(str(error)) from None


def stop() -> None:
    """Stop sampling and forget every record. If tracemalloc started after the sampler, it stays
    hooked: the sampler's hooks stay in its chain, passing everything through. Only the
    interpreter that started the sampler may stop it (SamplingUnavailable otherwise)."""
    if _memprof is None:
        return
    with _lock:
        try:
            _memprof.stop()
        except RuntimeError as error:
            raise SamplingUnavailable(str(error)) from None


def is_running() -> bool:
    return _memprof is not None and _memprof.is_running()


def stats() -> dict[str, int | bool]:
    """The sampler's counters (see _memprof.stats): running, rate, max_frames, max_bytes,
    samples, dropped, folded, table_full (samples counted in the one "table full" record past
    the cap), records, stacks, locations, functions, live_blocks, own_bytes."""
    if _memprof is None:
        return {"running": False}
    return _memprof.stats()


@contextmanager
def collection_paused() -> Iterator[None]:
    """No garbage collection while the profiler works (capturing, encoding): what it allocates
    would start collections of the whole heap, which at a heap's size stall everything for far
    longer than the profile takes. The collection they would have started runs after (the
    counts stay), unless the service itself turned collection off. Nests, across threads."""
    global _pauses, _collecting
    with _pause_lock:
        if _pauses == 0:
            _collecting = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _collecting:
                gc.enable()


def capture() -> SampledHeap:
    """The records now, their frames named; empty if the sampler is not running."""
    if _memprof is None:
        return SampledHeap([], DEFAULT_RATE, DEFAULT_FRAMES)
    with collection_paused():
        return _capture()


def _capture() -> SampledHeap:
    global _stacks
    with _lock:  # one reader of the snapshots' news at a time
        try:
            snapshot = _memprof.snapshot()
        except RuntimeError as error:
            raise SamplingUnavailable(str(error)) from None
        if snapshot is None:
            return SampledHeap([], DEFAULT_RATE, DEFAULT_FRAMES)
        counters, resync, rows, stacks, locations, functions, *dead = snapshot
        if _stacks.generation != counters["generation"]:
            _stacks = SampledStacks(int(counters["generation"]))
        _stacks.update(resync, stacks, locations, functions, (dead[0], dead[1], dead[2]))
        named = _stacks.stacks
    records = [
        Record(named[stack_id], stack_id, size_class, label, *counts)
        for stack_id, size_class, label, _kind, *counts in _RECORD_ROW.iter_unpack(rows)
        if counts[1]  # allocated something
    ]
    return SampledHeap(records, int(counters["rate"]), int(counters["max_frames"]), counters)


def size_class(size: int) -> int:
    """The sampler's size class of a block of `size` bytes (as _memprof.c's size_class): 16-byte
    steps up to 512 bytes, then 8 classes per power of two, at most 12.5% apart."""
    if size <= 512:
        return (size + 15) // 16
    bits = (size - 1).bit_length() - 1
    return 32 + (bits - 9) * 8 + (size - 1 - (1 << bits)) // (1 << (bits - 3)) + 1


def thread_names(serials: set[int]) -> dict[int, str]:
    """The names of the sampler's threads (records keep a thread's serial)."""
    live = _memprof.threads() if _memprof is not None else []
    return labels.thread_names(serials, live)


def sampled_stacks() -> SampledStacks:
    """The names of the sampler's numbers as of the last capture."""
    return _stacks


def location_at(address: int) -> Location | None:
    """The sampled location whose fake address is `address` (or just below it), for `symbol`."""
    return _stacks.by_address.get(address & ~0xF)


def estimated_inuse_bytes() -> int:
    """The live heap that the samples stand for, unsampled as Go's profile does (0 when not
    running): the number behind the service's /metrics gauge. A counter the sampler keeps as
    blocks come and go: no capture, nothing to wait for."""
    return _memprof.inuse_estimate() if _memprof is not None else 0


def scale_heap_sample(count: int, size: int, rate: int) -> tuple[int, int]:
    """Go's runtime/pprof scaleHeapSample: what `count` sampled blocks totalling `size` bytes
    stand for. A block of s bytes is sampled with probability 1 - exp(-s/rate)."""
    if count == 0 or size == 0:
        return 0, 0
    if rate <= 1:
        return count, size  # every block was recorded
    scale = 1 / (1 - math.exp(-(size / count) / rate))  # Go's, as pprof reads the text form
    return int(count * scale), int(size * scale)


_lock = threading.Lock()  # one start, stop or capture at a time
_stacks = SampledStacks(-1)
_pause_lock = threading.Lock()
_pauses = 0  # how many pieces of the profiler's work are running
_collecting = True  # whether collection was on when the first of them began


def _new_lock_in_child() -> None:
    global _lock, _pause_lock, _pauses
    _lock, _pause_lock = threading.Lock(), threading.Lock()
    if _pauses and _collecting:  # a thread of the parent was in the middle of its work
        gc.enable()
    _pauses = 0


os.register_at_fork(after_in_child=_new_lock_in_child)
