"""Building a profile in a forked copy of the process, so that the service does not pay for it.

tracemalloc cannot be paused: while it traces, every allocation the profiler makes is traced too,
at many times its normal cost, and a million live blocks take seconds to walk while the event loop
waits. So the work runs in a child made with fork(): it shares the parent's memory as it was, stops
tracing as soon as it has read the traces, builds the answer at full speed, writes the bytes back
through a pipe and exits without cleaning up. The parent stalls only for the fork itself.

Where fork() does not exist, or the child fails, the same work runs here, in-process.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import sys
import time
import warnings
from collections.abc import Callable

logger = logging.getLogger("asgi_pprof")

CHILD_TIMEOUT_SECONDS = 120.0


class ChildFailed(Exception):
    """The forked child exited badly or took too long."""


def run(work: Callable[[bool], bytes], timeout: float = CHILD_TIMEOUT_SECONDS) -> bytes:
    """`work(in_child)` in a forked child if possible, else here; its bytes either way.

    `in_child` tells `work` that it may stop tracing: only the child's copy of tracemalloc stops.
    """
    if not hasattr(os, "fork"):
        return work(False)
    try:
        return _run_forked(work, timeout)
    except (ChildFailed, OSError) as error:
        logger.warning("profiling in a forked child failed (%s); profiling in-process", error)
        return work(False)


def _run_forked(work: Callable[[bool], bytes], timeout: float) -> bytes:
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
        data = _read_all(read_end, time.monotonic() + timeout)
    except ChildFailed:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise ChildFailed(f"child exited with status {os.waitstatus_to_exitcode(status)}")
    return data


def _child(work: Callable[[bool], bytes], read_end: int, write_end: int) -> None:
    gc.disable()  # a collection here could run the parent's finalizers (flushing its files)
    status = 1
    try:
        os.close(read_end)
        view = memoryview(work(True))
        while view:
            view = view[os.write(write_end, view) :]
        status = 0
    except BaseException as error:  # the parent logs the failure; the child must never return
        print(f"pprof child: {type(error).__name__}: {error}", file=sys.stderr)
    finally:
        os._exit(status)  # no atexit, no finalizers: they belong to the parent


def _read_all(fd: int, deadline: float) -> bytes:
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise ChildFailed("child took too long")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
