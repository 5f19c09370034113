"""Heap builds, one at a time: each forks a child (see `forked`) that may copy as much memory as
tracemalloc's traces take, so two at once could take twice that from the service's limit."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

from asgi_pprof import forked


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
