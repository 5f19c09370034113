"""Heap profiles from tracemalloc, like Go's runtime/pprof heap profile, but exact.

tracemalloc records every live block with the stack that allocated it (up to a depth set when it
starts), so a profile here is not sampled: the period is 1. It sees live blocks only, so there are
no allocation totals (`alloc_*`) as in Go, only what is in use.

Two ways to trace:
- from startup (`start_tracing`): every later allocation is recorded; `/heap` shows all of it.
- on demand: a window (`seconds=N`) starts tracing, waits, and stops tracing when the last open
  window closes, so a service that is not being profiled pays nothing.
"""

from __future__ import annotations

import gc
import marshal
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from asgi_pprof.profile import ProfileBuilder
from asgi_pprof.symbolize import Frame, addressed_frames, legacy_record, remember

Stack = tuple[Frame, ...]  # leaf first, as tracemalloc gives it

# Blocks allocated by the profiler itself, or by tracemalloc, are not the service's memory.
_OWN_FILES = (os.path.dirname(__file__) + os.sep, tracemalloc.__file__)
# ...except the middleware, which every request of a wrapped application passes through.
_PASSED_THROUGH = os.path.join(os.path.dirname(__file__), "middleware.py")


@dataclass
class HeapProfile:
    """In-use memory by stack: {stack: [blocks, bytes]}; a window's growth may be negative."""

    stacks: dict[Stack, list[int]]
    frames: int  # tracemalloc's depth: stacks deeper than this are cut
    time_ns: int = field(default_factory=time.time_ns)
    duration_ns: int = 0  # 0: a snapshot of what is in use now; else a window's growth
    statistics: list[str] = field(default_factory=list)  # the debug=1 footer, read at capture

    def minus(self, earlier: HeapProfile) -> HeapProfile:
        """The growth since `earlier`, by stack, like Go's delta profiles."""
        stacks = {stack: list(values) for stack, values in self.stacks.items()}
        for stack, (blocks, size) in earlier.stacks.items():
            values = stacks.setdefault(stack, [0, 0])
            values[0] -= blocks
            values[1] -= size
        growth = {stack: values for stack, values in stacks.items() if values != [0, 0]}
        duration_ns = self.time_ns - earlier.time_ns
        statistics = [*self.statistics, f"# WindowSeconds = {duration_ns / 1e9:.3f}"]
        return HeapProfile(growth, self.frames, earlier.time_ns, duration_ns, statistics)

    def total(self) -> tuple[int, int]:
        return sum(v[0] for v in self.stacks.values()), sum(v[1] for v in self.stacks.values())

    def to_bytes(self) -> bytes:
        return marshal.dumps((self.stacks, self.frames, self.time_ns, self.statistics))

    @classmethod
    def from_bytes(cls, data: bytes) -> HeapProfile:
        stacks, frames, time_ns, statistics = marshal.loads(data)
        return cls(stacks, frames, time_ns, 0, statistics)


def _itself(stack: Stack) -> Stack:
    return stack


def _is_own(stack: Stack) -> bool:
    return any(
        filename.startswith(_OWN_FILES) and filename != _PASSED_THROUGH for filename, _ in stack
    )


def capture(in_child: bool = False) -> HeapProfile:
    """What is in use now, grouped by allocating stack. Empty when tracemalloc is not tracing.

    `in_child` is for a forked child (see `forked`): once the traces are read, the child stops
    its own copy of tracemalloc, so that everything after runs untraced, at full speed. Without it
    the loop below must allocate almost nothing per block: each allocation would itself be traced.
    In a child, the footer's resident memory is the parent's: the service's.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a full collection in the middle would scan the million tuples we just made
    try:
        statistics = _memory_statistics(os.getppid() if in_child else os.getpid())
        frames = tracemalloc.get_traceback_limit()
        # The profile's time is when its traces were read, not when the walk below ends: a
        # window's length must not include the seconds that walking a large heap takes.
        time_ns = time.time_ns()
        traces = tracemalloc._get_traces()  # what take_snapshot() uses, without the Snapshot
        if in_child:
            tracemalloc.stop()
        # Blocks with the same stack share one stack tuple. Untraced, its id() is the cheapest key;
        # traced, id() would allocate an int per block, so the tuple itself is the key (hashing it
        # reads every frame, but allocates nothing).
        key_of: Callable[[Stack], object] = id if in_child else _itself
        sizes_by_key: dict[object, list[int]] = {}
        stack_by_key: dict[object, Stack] = {}
        for _domain, size, stack, _depth in traces:
            key = key_of(stack)
            sizes = sizes_by_key.get(key)
            if sizes is None:
                sizes = sizes_by_key[key] = []
                stack_by_key[key] = stack
            sizes.append(size)
        del traces
    finally:
        if gc_was_enabled:
            gc.enable()
    # Stacks whose blocks are all empty (malloc(0)) are left out, as pprof leaves out a sample of
    # no bytes when it reads the legacy text: both forms then hold the same samples. Two keys can
    # hold equal stacks (tracemalloc tells apart the same frames cut from two depths): add up.
    stacks: dict[Stack, list[int]] = {}
    for key, sizes in sizes_by_key.items():
        stack = stack_by_key[key]
        if not any(sizes) or _is_own(stack):
            continue
        counts = stacks.setdefault(stack, [0, 0])
        counts[0] += len(sizes)
        counts[1] += sum(sizes)
    return HeapProfile(stacks, frames, time_ns, statistics=statistics)


def build(in_child: bool, debug: int, start: HeapProfile | None = None) -> bytes:
    """Capture, subtract the window's `start`, and encode: the work
    that `forked.run` does in a child. Returns what `open_answer` unpacks in the parent."""
    named_before = len(addressed_frames())
    profile = capture(in_child)
    if start is not None:
        profile = profile.minus(start)
    payload = render_text(profile).encode() if debug > 0 else encode(profile)
    return marshal.dumps((payload, addressed_frames()[named_before:]))


def open_answer(built: bytes) -> bytes:
    """The profile bytes from `build`; frames named in the child become known to `symbol`."""
    payload, frames = marshal.loads(built)
    remember(frames)
    return payload


_open_windows = 0
_started_by_windows = False


@contextmanager
def tracing_window(frames: int) -> Iterator[bool]:
    """Traces while open; the last window to close stops tracing, if a window started it.

    Yields whether tracing was on already: if not, the window starts from nothing in use.
    """
    global _open_windows, _started_by_windows
    traced_before = tracemalloc.is_tracing()
    if not traced_before:
        tracemalloc.start(frames)
        _started_by_windows = True
    _open_windows += 1
    try:
        yield traced_before
    finally:
        _open_windows -= 1
        if _open_windows == 0 and _started_by_windows:
            _started_by_windows = False
            tracemalloc.stop()


def start_tracing(frames: int) -> None:
    """Trace every allocation from now on (for services that want `/heap` to show everything)."""
    global _started_by_windows
    if not tracemalloc.is_tracing():
        tracemalloc.start(frames)
    _started_by_windows = False  # tracing is the service's now: closing windows must not stop it


def encode(profile: HeapProfile) -> bytes:
    """The gzipped profile.proto that `go tool pprof` reads."""
    window = profile.duration_ns > 0
    builder = ProfileBuilder(
        sample_types=[("inuse_objects", "count"), ("inuse_space", "bytes")],
        default_sample_type="inuse_space",
        period_type=("space", "bytes"),
        period=1,  # tracemalloc records every block: nothing is sampled, nothing is scaled
        time_nanos=profile.time_ns,
        duration_nanos=profile.duration_ns,
        comments=_comments(profile),
        mapping_file="python" if not window else "python (window growth)",
    )
    for stack, values in _largest_first(profile):
        builder.add_sample(stack, values)
    return builder.encode()


def _comments(profile: HeapProfile) -> list[str]:
    comments = [f"tracemalloc: every live block, stacks cut at {profile.frames} frames"]
    if profile.duration_ns:
        seconds = profile.duration_ns / 1e9
        comments.append(f"growth over {seconds:.1f}s: in use at the end minus in use at the start")
    return comments


def _largest_first(profile: HeapProfile) -> list[tuple[Stack, list[int]]]:
    return sorted(profile.stacks.items(), key=lambda item: item[1][1], reverse=True)


def render_text(profile: HeapProfile) -> str:
    """Go's legacy text heap format (`debug=1`), which `go tool pprof` also reads.

    Header `heap profile: B: S [0: 0] @ heap_v2/1`: B blocks and S bytes in use; `[0: 0]` because
    tracemalloc has no allocation totals (pprof then offers only in-use values); `heap_v2/1` because
    every block is recorded, so pprof must not rescale the numbers as it does for Go's sampled ones.
    """
    blocks, size = profile.total()
    lines = [f"heap profile: {blocks}: {size} [0: 0] @ heap_v2/1"]
    for stack, (count, stack_size) in _largest_first(profile):
        lines += legacy_record(f"{count}: {stack_size} [0: 0]", stack)
    lines.extend(profile.statistics)
    return "\n".join(lines) + "\n"


def _memory_statistics(pid: int) -> list[str]:
    """The footer: Python's counterpart of Go's `# runtime.MemStats`, only numbers we measure.

    Read in the forked child, whose copy of tracemalloc and the collector is the service's as it
    was at the fork; but its resident memory is its own, so `RSS` is read from the service, `pid`.
    """
    traced, peak = tracemalloc.get_traced_memory()
    stats = [
        "# python.MemStats",
        f"# Tracing = {tracemalloc.is_tracing()}",
        f"# TracebackLimit = {tracemalloc.get_traceback_limit()}",
        f"# TracedBytes = {traced}",
        f"# PeakTracedBytes = {peak}",
        f"# TracemallocOverheadBytes = {tracemalloc.get_tracemalloc_memory()}",
    ]
    rss = resident_bytes(pid)
    if rss is not None:
        stats.append(f"# RSS = {rss}")
    gc_stats = gc.get_stats()
    stats.append(f"# GCCollections = {[s['collections'] for s in gc_stats]}")
    stats.append(f"# GCCollected = {[s['collected'] for s in gc_stats]}")
    stats.append(f"# GCUncollectable = {[s['uncollectable'] for s in gc_stats]}")
    return stats


def resident_bytes(pid: int) -> int | None:
    """The resident memory of process `pid`, in bytes; None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
