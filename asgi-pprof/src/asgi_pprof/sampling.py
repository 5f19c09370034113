"""The sampling heap profiler: Go's runtime.MemProfile for Python, always on and nearly free.

The C extension `_memprof` hooks the PyMem and PyObject allocators and records one allocation
every `rate` bytes on average (Go's runtime.MemProfileRate, default 512 KiB), with its stack, and
follows the sampled blocks until they are freed. This module starts and stops it, reads its
records (`capture`) and names their frames as the tracemalloc profile names them
(`module.co_qualname`). `sampled_profile` writes them as Go writes `heap` and `allocs`.

What it does not see: allocations through PyMem_RawMalloc or malloc itself (C libraries' own
buffers, the interpreter's arenas and thread stacks), and anything allocated before it started.

Where the extension cannot run (not built, not CPython 3.11 with the GIL), `start` raises
SamplingUnavailable with the reason, and the tracemalloc profile works as before.
"""

from __future__ import annotations

import math
import os
import threading
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import CodeType

from asgi_pprof.symbolize import Frame, function_of_code, name_frames

try:
    from asgi_pprof import _memprof
except ImportError as error:  # not built, or an interpreter it does not support
    _memprof = None
    _UNAVAILABLE_REASON = f"the sampling heap profiler is not available: {error}"
else:
    _UNAVAILABLE_REASON = ""

DEFAULT_RATE = 524288  # Go's runtime.MemProfileRate: one sample per 512 KiB allocated
DEFAULT_FRAMES = 64
RATE_VARIABLE = "PPROF_MEM_PROFILE_RATE"
MAX_RATE = 1 << 40

Stack = tuple[Frame, ...]  # leaf first
_OWN_FOLDER = os.path.dirname(__file__) + os.sep


class SamplingUnavailable(RuntimeError):
    """The sampling heap profiler cannot run in this interpreter, or cannot start now."""


@dataclass(frozen=True)
class Record:
    """One stack and block size, as Go's MemProfileRecord: counts of sampled blocks."""

    stack: Stack
    size: int  # bytes per block: records are keyed by stack and size, as Go's buckets are
    allocs: int  # sampled blocks allocated since start
    frees: int  # ... and freed since

    @property
    def inuse(self) -> int:
        return self.allocs - self.frees


@dataclass
class SampledHeap:
    """The sampler's records at one moment."""

    records: list[Record]
    rate: int
    frames: int
    time_ns: int = field(default_factory=time.time_ns)


def available() -> bool:
    """Whether the extension is here and this interpreter is one it supports."""
    return _memprof is not None


def unavailable_reason() -> str:
    """Why `available()` is false; empty when it is true."""
    return _UNAVAILABLE_REASON


def rate_from_environ(environ: Mapping[str, str] = os.environ) -> int:
    """PPROF_MEM_PROFILE_RATE, or Go's default of 524,288 bytes; ValueError if it is not a
    whole number of bytes from 1 to 2**40."""
    value = environ.get(RATE_VARIABLE, "").strip()
    if not value:
        return DEFAULT_RATE
    if not value.isdigit() or not 1 <= int(value) <= MAX_RATE:
        raise ValueError(
            f"{RATE_VARIABLE}={value!r} is not allowed; use an integer from 1 to {MAX_RATE}"
        )
    return int(value)


def start(rate: int | None = None, frames: int = DEFAULT_FRAMES) -> None:
    """Sample one allocation per `rate` bytes on average (default: PPROF_MEM_PROFILE_RATE, else
    524,288; 1 records every allocation), keeping up to `frames` frames of each stack.

    Start it before tracemalloc, if both are wanted: tracemalloc started after it wraps it, and
    puts it back when it stops; a sampler started after tracemalloc would be unhooked silently by
    tracemalloc.stop(), so that is refused. SamplingUnavailable says why it cannot start.
    """
    if _memprof is None:
        raise SamplingUnavailable(_UNAVAILABLE_REASON)
    if rate is None:
        rate = rate_from_environ()
    if not 1 <= rate <= MAX_RATE:
        raise ValueError(f"rate must be from 1 to {MAX_RATE} bytes, not {rate}")
    if not 1 <= frames <= _memprof.MAX_FRAMES:
        raise ValueError(f"frames must be from 1 to {_memprof.MAX_FRAMES}, not {frames}")
    if tracemalloc.is_tracing() and not _memprof.hooks_installed():
        raise SamplingUnavailable(
            "tracemalloc is tracing: start the sampling heap profiler before tracemalloc, or "
            "stop tracemalloc first (its stop() would silently unhook a sampler started after it)"
        )
    with _lock:
        try:
            _memprof.start(rate, frames)
        except RuntimeError as error:
            raise SamplingUnavailable(str(error)) from None


def stop() -> None:
    """Stop sampling and forget every record. If tracemalloc started after the sampler, it stays
    hooked: the sampler's hooks stay in its chain, passing everything through."""
    if _memprof is not None:
        with _lock:
            _memprof.stop()


def is_running() -> bool:
    return _memprof is not None and _memprof.is_running()


def stats() -> dict[str, int | bool]:
    """The sampler's counters: running, rate, max_frames, samples, dropped, records,
    live_blocks, own_bytes (the C memory of its tables)."""
    if _memprof is None:
        return {"running": False}
    return _memprof.stats()


def capture() -> SampledHeap:
    """The records now, their frames named; empty if the sampler is not running.

    Records whose stacks differ only by instruction offsets within a line are merged: profiles
    show lines, and the block sizes stay apart. Blocks that the profiler's own lines allocated
    (the little that `own_work` does not cover: entering it) are left out. Each record's stack
    is read from the sampler and named once, at the first capture that sees it.
    """
    if _memprof is None:
        return SampledHeap([], DEFAULT_RATE, DEFAULT_FRAMES)
    with own_work():
        return _capture()


class _KnownStacks:
    """What earlier snapshots said of each record, by its number: a record's stack never
    changes while the sampler runs, so it is read, named and grouped once."""

    def __init__(self, generation: int = -1) -> None:
        self.generation = generation  # the sampler's start count: numbers restart with it
        self.group_of_record: list[int] = []
        self.keys: list[tuple[Stack, int]] = []  # by group: (stack, block size)
        self.own: list[bool] = []  # by group: allocated by the profiler's own lines
        self.group_of_key: dict[tuple[Stack, int], int] = {}
        self.frames: dict[tuple[int, int], Frame] = {}  # (id(code), line): the code is alive

    def learn(self, size: int, flat: tuple[CodeType | int, ...]) -> None:
        stack = []
        named: dict[Frame, tuple[str, int]] = {}
        for index in range(0, len(flat), 2):
            code, lineno = flat[index], flat[index + 1]
            assert isinstance(code, CodeType) and isinstance(lineno, int)
            frame = self.frames.get((id(code), lineno))
            if frame is None:
                frame = self.frames[id(code), lineno] = (code.co_filename, lineno)
                named[frame] = function_of_code(code, lineno)
            stack.append(frame)
        name_frames(named)
        key = (tuple(stack), size)
        group = self.group_of_key.get(key)
        if group is None:
            group = self.group_of_key[key] = len(self.keys)
            self.keys.append(key)
            self.own.append(bool(stack) and stack[0][0].startswith(_OWN_FOLDER))
        self.group_of_record.append(group)


_known = _KnownStacks()


def _first(record: tuple[int, ...]) -> int:
    return record[0]


def _capture() -> SampledHeap:
    global _known
    with _lock:
        settings = _memprof.stats()
        if settings["generation"] != _known.generation:
            _known = _KnownStacks(int(settings["generation"]))
        raw = _memprof.snapshot(len(_known.group_of_record))
    for index, size, _, _, flat in sorted((r for r in raw if r[4] is not None), key=_first):
        assert index == len(_known.group_of_record), "records are numbered without gaps"
        _known.learn(size, flat)
    counts = [[0, 0] for _ in _known.keys]
    for index, _, allocs, frees, _ in raw:
        values = counts[_known.group_of_record[index]]
        values[0] += allocs
        values[1] += frees
    del raw  # the snapshot's references to code objects
    records = [
        Record(*_known.keys[group], allocs, frees)
        for group, (allocs, frees) in enumerate(counts)
        if allocs and not _known.own[group]
    ]
    return SampledHeap(records, int(settings["rate"]), int(settings["max_frames"]))


@contextmanager
def own_work() -> Iterator[None]:
    """The profiler's own work in this thread (capturing, encoding): its allocations are not
    sampled. One such piece of work at a time, process-wide."""
    if _memprof is None:
        yield
        return
    global _own_work_depth
    with _own_work_lock:
        _own_work_depth += 1
        _memprof.set_busy(True)
        try:
            yield
        finally:
            _own_work_depth -= 1
            _memprof.set_busy(_own_work_depth > 0)


def estimated_inuse_bytes() -> int:
    """The live heap that the samples stand for, unsampled as Go's profile does (0 when not
    running): the number behind the service's /metrics gauge."""
    heap = capture()
    return sum(
        scale_heap_sample(record.inuse, record.inuse * record.size, heap.rate)[1]
        for record in heap.records
    )


def scale_heap_sample(count: int, size: int, rate: int) -> tuple[int, int]:
    """Go's runtime/pprof scaleHeapSample: what `count` sampled blocks totalling `size` bytes
    stand for. A block of s bytes is sampled with probability 1 - exp(-s/rate)."""
    if count == 0 or size == 0:
        return 0, 0
    if rate <= 1:
        return count, size  # every block was recorded
    scale = 1 / (1 - math.exp(-(size / count) / rate))
    return int(count * scale), int(size * scale)


_lock = threading.Lock()  # one start, stop or snapshot at a time
_own_work_lock = threading.RLock()  # the C side's guard is one thread's
_own_work_depth = 0


def _new_lock_in_child() -> None:
    global _lock, _own_work_lock
    _lock = threading.Lock()
    _own_work_lock = threading.RLock()


os.register_at_fork(after_in_child=_new_lock_in_child)
