"""Building a profile in a forked copy of the process, so that the service does not pay for it.

tracemalloc cannot be paused: while it traces, every allocation the profiler makes is traced too,
at many times its normal cost, and a million live blocks take seconds to walk while the event loop
waits. So the work runs in a child made with fork(): it shares the parent's memory as it was, stops
tracing as soon as it has read the traces, builds the answer at full speed, writes the bytes back
through a pipe and exits without cleaning up. The parent stalls only for the fork itself.

Where fork() does not exist, or cannot fork for another reason than memory, the same work runs
here, in-process. A child that fails, hangs or runs out of memory is an error for the caller, never
a rebuild here: what the child could not do in CHILD_TIMEOUT_SECONDS would stall the service far
longer, traced. Memory above all: the child's copy of the traces is new memory that counts against
the same limit as the service (a container's, say), so the child volunteers to be the process that
the kernel's out-of-memory killer picks, and if it is killed, the caller gets ChildOutOfMemory,
which says how much memory the profile needed: the same work here would get the service killed.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import select
import signal
import sys
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable

logger = logging.getLogger("asgi_pprof")

# Under `go tool pprof`'s own 60 s wait for a profile, so that the user reads why it failed.
CHILD_TIMEOUT_SECONDS = 45.0
_POLL_SECONDS = 0.1  # how soon a cancelled build notices


class ChildFailed(Exception):
    """The forked child exited badly, took too long, or was cancelled: the message says which."""


class ChildOutOfMemory(ChildFailed):
    """The forked child was killed (by the kernel's out-of-memory killer) or could not be forked."""


def run(
    work: Callable[[bool], bytes],
    timeout: float = CHILD_TIMEOUT_SECONDS,
    cancelled: threading.Event | None = None,
) -> bytes:
    """`work(in_child)` in a forked child if possible, else here; its bytes either way.

    `in_child` tells `work` that it may stop tracing: only the child's copy of tracemalloc stops.
    Setting `cancelled` kills the child at once (its client has gone, the service stops).
    """
    if not hasattr(os, "fork"):
        return work(False)
    before = _memory_use()
    try:
        return _run_forked(work, timeout, before, cancelled or threading.Event())
    except OSError as error:
        if error.errno == errno.ENOMEM:
            raise ChildOutOfMemory(_out_of_memory_message(before, "could not be forked")) from error
        logger.warning("could not fork to build a profile (%s); building it in-process", error)
        return work(False)


def _run_forked(
    work: Callable[[bool], bytes],
    timeout: float,
    before: dict[str, int],
    cancelled: threading.Event,
) -> bytes:
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a threaded process may deadlock the child; this child
        # runs only `work`, and a child that hangs is killed after `timeout`.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        _child(work, read_end, write_end)
    os.close(write_end)
    try:
        data = _read_all(read_end, timeout, cancelled)
    except ChildFailed:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        # Not ours (we kill only a child that took too long, and raise above): the OOM killer's.
        raise ChildOutOfMemory(_out_of_memory_message(before, "was killed (SIGKILL)"))
    if os.waitstatus_to_exitcode(status) != 0:
        raise ChildFailed(f"child exited with status {os.waitstatus_to_exitcode(status)}")
    return data


def _child(work: Callable[[bool], bytes], read_end: int, write_end: int) -> None:
    gc.disable()  # a collection here could run the parent's finalizers (flushing its files)
    status = 1
    try:
        os.close(read_end)
        _volunteer_for_the_oom_killer()
        view = memoryview(work(True))
        while view:
            view = view[os.write(write_end, view) :]
        status = 0
    except BaseException as error:  # the parent logs the failure; the child must never return
        print(f"pprof child: {type(error).__name__}: {error}", file=sys.stderr)
    finally:
        os._exit(status)  # no atexit, no finalizers: they belong to the parent


def _read_all(fd: int, timeout: float, cancelled: threading.Event) -> bytes:
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        if cancelled.is_set():
            raise ChildFailed("heap profile cancelled")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChildFailed(
                f"heap profile not built: the child process that builds it took more than "
                f"{timeout:g} s. Trace fewer frames, take a "
                "window (heap?seconds=N) while tracing only on demand, or use the sampling heap "
                "profiler."
            )
        if not select.select([fd], [], [], min(remaining, _POLL_SECONDS))[0]:
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# What a tracemalloc profile costs the child in new memory: the pages it copies on write (it
# touches the interpreter's objects, and freeing its copy of the trace tables touches those), its
# list of the traces, the grouping. Measured once, by hand, on the leaky service at 8 frames in a
# memory cgroup (the peak of its charge during a profile): 18, 30 and 49 MiB with 1.3, 4.5 and
# 9.2 MiB of tracemalloc tables, that is about 13 MiB plus 4 bytes per byte of the tables.
CHILD_BASE_BYTES = 13 * 2**20
CHILD_BYTES_PER_TRACEMALLOC_BYTE = 4


def _volunteer_for_the_oom_killer() -> None:
    """Make this process the first that the kernel kills when memory runs out (any user may raise
    its own score), so that a profile that does not fit kills the child, never the service."""
    try:
        with open("/proc/self/oom_score_adj", "w") as score:
            score.write("1000")
    except OSError:
        pass  # not Linux, or no /proc: nothing to volunteer with


def _memory_use() -> dict[str, int]:
    """What the parent knows before forking: tracemalloc's sizes, and the memory cgroup's."""
    use = {"tables": tracemalloc.get_tracemalloc_memory()}
    use["traced"] = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
    for name, path in _CGROUP_FILES.items():
        try:
            with open(path) as file:
                use[name] = int(file.read())
        except (OSError, ValueError):  # no such file, or "max" (no limit)
            pass
    return use


_CGROUP_FILES = {
    "limit": "/sys/fs/cgroup/memory.max",  # cgroup v2
    "usage": "/sys/fs/cgroup/memory.current",
    "limit_v1": "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    "usage_v1": "/sys/fs/cgroup/memory/memory.usage_in_bytes",
}
_NO_LIMIT_V1 = 1 << 60  # cgroup v1 reports "no limit" as a huge number


def _out_of_memory_message(before: dict[str, int], what: str) -> str:
    mib = 2**20
    needed = CHILD_BASE_BYTES + before["tables"] * CHILD_BYTES_PER_TRACEMALLOC_BYTE
    message = (
        f"heap profile not built: the child process that builds it {what}, for lack of memory. "
        f"A tracemalloc profile of this process ({before['traced'] / mib:.0f} MiB of live traced "
        f"memory, {before['tables'] / mib:.0f} MiB of tracemalloc tables) needs about "
        f"{needed / mib:.0f} MiB beyond what the process already uses"
    )
    limit = before.get("limit", before.get("limit_v1", _NO_LIMIT_V1))
    usage = before.get("usage", before.get("usage_v1"))
    if limit < _NO_LIMIT_V1 and usage is not None:
        message += (
            f"; {max(limit - usage, 0) / mib:.0f} MiB were free under the memory limit of "
            f"{limit / mib:.0f} MiB"
        )
    return message + (
        ". The service was left running. Instead: raise the memory limit by that much, take a "
        "window (heap?seconds=N) while tracing only on demand, trace fewer frames, or use the "
        "sampling heap profiler (PPROF_HEAP_PROFILER=sampling), which needs no child."
    )
