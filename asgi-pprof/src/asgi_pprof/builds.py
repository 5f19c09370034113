"""Heap builds, one at a time: each forks a child (see `forked`) that may copy as much memory as
tracemalloc's traces take, so two at once could take twice that from the service's limit. And the
garbage collections that `gc=1` asks for before a heap profile, one at a time as well."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from asgi_pprof import forked

T = TypeVar("T")


class HeapBuilds:
    """One heap build at a time in the process: each forks a child that may copy as much memory
    as the traces take. A snapshot asked for while the same one is being built shares it; a
    build that nobody waits for any more is cancelled, and its child killed."""

    _lock = threading.Lock()  # the process's: builds run in worker threads, from any event loop

    def __init__(self) -> None:
        self._pending: dict[object, _SharedBuild] = {}

    async def alone(self, work: Callable[[bool], bytes]) -> bytes:
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(self._run, work, cancelled)
        except asyncio.CancelledError:
            cancelled.set()  # the worker thread kills the child and returns at once
            raise

    async def shared(self, key: object, work: Callable[[bool], bytes]) -> bytes:
        build = self._pending.get(key)
        if build is None or build.task.get_loop() is not asyncio.get_running_loop():
            build = self._pending[key] = _SharedBuild(asyncio.ensure_future(self.alone(work)))
            build.task.add_done_callback(lambda done: self._forget(key, done))
        build.waiting += 1
        try:
            # Shielded: a client that leaves does not cancel the build the others wait for...
            return await asyncio.shield(build.task)
        finally:
            build.waiting -= 1
            if build.waiting == 0 and not build.task.done():
                build.task.cancel()  # ...but the last one to leave does.

    def _forget(self, key: object, task: asyncio.Task[bytes]) -> None:
        build = self._pending.get(key)
        if build is not None and build.task is task:
            del self._pending[key]

    @classmethod
    def _run(cls, work: Callable[[bool], bytes], cancelled: threading.Event) -> bytes:
        with cls._lock:
            return forked.run(work, cancelled=cancelled)


@dataclass
class _SharedBuild:
    task: asyncio.Task[bytes]
    waiting: int = 0


# gc=1: a full collection holds the GIL, whichever thread runs it, for as long as it takes (1.75 s
# at 237 MB). One at a time, process-wide; and after one, none for four times its length (at
# least a second): requests asking meanwhile read the heap that collection left. So however many
# clients ask, collections hold the service at most a fifth of the time.
MIN_SECONDS_BETWEEN_COLLECTIONS = 1.0
_collection = threading.Lock()
_next_collection = 0.0


def collect_garbage() -> bool:
    """Run a full collection for gc=1 unless one runs or ran just now; whether it ran."""
    global _next_collection
    if time.monotonic() < _next_collection or not _collection.acquire(blocking=False):
        return False
    try:
        started = time.monotonic()
        gc.collect()
        ended = time.monotonic()
        _next_collection = ended + max(MIN_SECONDS_BETWEEN_COLLECTIONS, 4 * (ended - started))
    finally:
        _collection.release()
    return True


class SampledBuilds:
    """The sampler's captures and builds, one at a time in the process, and shared: each is
    Python work in a thread that competes with the event loop for the GIL (a dozen at once held a
    `GET /` for half a second), while one at a time leaves the loop every other turn. A request
    for a profile being built shares that build."""

    _lock = threading.Lock()  # the process's: builds run in worker threads, from any event loop

    def __init__(self) -> None:
        self._pending: dict[object, asyncio.Future[object]] = {}

    async def alone(self, work: Callable[[], T]) -> T:
        return await asyncio.to_thread(self._run, work)

    async def shared(self, key: object, work: Callable[[], T]) -> T:
        pending = self._pending.get(key)
        if pending is None or pending.get_loop() is not asyncio.get_running_loop():
            pending = self._pending[key] = asyncio.ensure_future(self.alone(work))
            pending.add_done_callback(lambda done: self._forget(key, done))
        # Shielded: a client that leaves does not cancel what the others wait for (milliseconds).
        return await asyncio.shield(pending)  # type: ignore[return-value]

    def _forget(self, key: object, done: asyncio.Future[object]) -> None:
        if self._pending.get(key) is done:
            del self._pending[key]

    @classmethod
    def _run(cls, work: Callable[[], T]) -> T:
        with cls._lock:
            return work()
