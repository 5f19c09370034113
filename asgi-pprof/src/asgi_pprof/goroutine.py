"""Go's goroutine profile for Python: every thread's stack and every pending asyncio task's stack.

A thread is the obvious counterpart of a goroutine; an asyncio task is the other one, and the one
that leaks in async services: a task that never finishes keeps its coroutine, its frames and all
they reference alive, as a stuck goroutine does.

Finding the tasks of every event loop, not only the serving one: `asyncio.all_tasks(loop)` needs
the loop, and Python lists neither loops nor other threads' running loops. Python 3.11 to 3.13 do
keep one registry of every task of every loop, `asyncio.tasks._all_tasks` (3.11) or
`_scheduled_tasks` plus `_eager_tasks` (3.12, 3.13): private names, but the ones `all_tasks`
itself reads, so they hold exactly what it would return for each loop. We read them the way
`all_tasks` does (a copy, retried if another thread changes the set meanwhile).

Python 3.14 keeps its own tasks in per-thread linked lists instead; the registry holds only
third-party tasks. There `asyncio.all_tasks(loop)` walks every thread's list, but keeps the tasks
of the one loop it is given (compared by identity), so we need the loops. A running loop is on the
stack of the thread that runs it: asyncio's own loops as `self` of `run_forever`, a loop run from C
(uvloop) as a local of the code that started it, or as the loop of the `asyncio.Runner` behind
`asyncio.run` (uvicorn's way). We take the loops held by a local of any thread's frame, plus this
thread's running loop and the loops of the registry's tasks, and ask `all_tasks` for each. Missed
there: the tasks of a loop that no frame holds (one run by a thread whose only reference to it is
in C code, or one that no thread runs and no frame holds). The other ways in were no better:
`asyncio.capture_call_graph` starts from a task one already has, and `asyncio.tools` reads a
process's memory from outside (`_remote_debugging`), which on itself would race the threads it
reads.

A task's stack is the chain of coroutines it is suspended in: `cr_frame` of its coroutine, then
of what that awaits (`cr_await`), down to the leaf; generators (`gi_yieldfrom`) and async
generators (`ag_await`) included. `Task.get_stack()` would give only the outermost frame. A task
that is running right now has no such chain (`cr_await` is None while it runs): its frames are the
top of the stack of the thread that runs it, so we take them from there.
"""

from __future__ import annotations

import asyncio
import gc
import re
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from asgi_pprof.profile import ProfileBuilder
from asgi_pprof.symbolize import Frame, address_of, function_of, legacy_record

Stack = tuple[Frame, ...]  # leaf first

_MAX_AWAIT_CHAIN = 1000  # a chain is as deep as the coroutines awaiting each other; never a cycle
_REGISTRY_NAMES = ("_all_tasks", "_scheduled_tasks", "_eager_tasks")
# asyncio's own tasks are in per-thread lists, which only `all_tasks(loop)` walks, loop by loop.
_TASKS_PER_THREAD = sys.version_info >= (3, 14)


@dataclass(frozen=True)
class Goroutine:
    """A thread or a task, with its stack."""

    kind: str  # "thread" or "task"
    title: str  # the header's middle: `123 "MainThread"` for a thread, the name for a task
    state: str  # "running" or "pending"
    stack: Stack


@dataclass
class GoroutineProfile:
    """How many threads and tasks stand in each stack; a window's growth may be negative."""

    counts: dict[Stack, int]
    time_ns: int = field(default_factory=time.time_ns)
    duration_ns: int = 0

    def minus(self, earlier: GoroutineProfile) -> GoroutineProfile:
        """The growth since `earlier`, by stack, like Go's `goroutine?seconds=N`."""
        counts = Counter(self.counts)
        counts.subtract(earlier.counts)
        growth = {stack: count for stack, count in counts.items() if count != 0}
        return GoroutineProfile(growth, earlier.time_ns, self.time_ns - earlier.time_ns)

    def total(self) -> int:
        return sum(self.counts.values())


def _stack_of(frames: Iterable[types.FrameType]) -> Stack:
    return tuple((frame.f_code.co_filename, frame.f_lineno or 0) for frame in frames)


def _thread_frames(frame: types.FrameType | None) -> list[types.FrameType]:
    """A thread's frames, leaf first."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def _registered_tasks() -> list[asyncio.Task]:
    """Every task in asyncio's registries, done or not (see the module's doc comment)."""
    tasks: list[asyncio.Task] = []
    for name in _REGISTRY_NAMES:
        registry = getattr(asyncio.tasks, name, None)
        if registry is None:
            continue
        for _attempt in range(1000):
            try:
                tasks.extend(list(registry))  # a WeakSet: copying fails if a thread adds meanwhile
                break
            except RuntimeError:
                continue
    return tasks


def _loops_held_by(frames: Iterable[types.FrameType]) -> set[asyncio.AbstractEventLoop]:
    """The event loops that these frames hold in a local: as themselves, or as the loop of an
    `asyncio.Runner`. Types are tested with `type()`: `isinstance` would read a proxy's
    `__class__`, which may run code."""
    loops: set[asyncio.AbstractEventLoop] = set()
    for frame in frames:
        # A copy, made in one step: another thread may change a module's globals meanwhile.
        for value in list(frame.f_locals.values()):
            if issubclass(type(value), asyncio.Runner):
                value = vars(value).get("_loop")
            if issubclass(type(value), asyncio.AbstractEventLoop):
                loops.add(value)
    return loops


def pending_tasks(
    frames_by_thread: dict[int, list[types.FrameType]] | None = None,
) -> list[asyncio.Task]:
    """Every task not yet done, of every event loop of the process (see the module's doc comment
    for what 3.14 can miss). `frames_by_thread`: every thread's frames, if already at hand."""
    tasks = {task for task in _registered_tasks() if not task.done()}
    loops: set[asyncio.AbstractEventLoop] = set()
    try:
        loops.add(asyncio.get_running_loop())
    except RuntimeError:  # no event loop runs in this thread
        pass
    if _TASKS_PER_THREAD:  # else the registry has them all
        loops.update(task.get_loop() for task in tasks)
        if frames_by_thread is None:
            frames_by_thread = _frames_by_thread()
        for frames in frames_by_thread.values():
            loops.update(_loops_held_by(frames))
    for loop in loops:
        tasks.update(asyncio.all_tasks(loop))
    return sorted(tasks, key=lambda task: _natural_key(task.get_name()))


def _frames_by_thread() -> dict[int, list[types.FrameType]]:
    """Every thread's frames, leaf first."""
    return {ident: _thread_frames(frame) for ident, frame in sys._current_frames().items()}


def _natural_key(name: str) -> list[str | int]:
    """Task-9 before Task-10: digit runs compare as numbers (they sit at the odd indexes)."""
    parts: list[str | int] = re.split(r"(\d+)", name)
    parts[1::2] = [int(digits) for digits in parts[1::2]]
    return parts


def _awaited_frames(awaitable: object) -> list[types.FrameType]:
    """The frames of a coroutine and of what it awaits, outermost first."""
    frames: list[types.FrameType] = []
    for _depth in range(_MAX_AWAIT_CHAIN):
        if isinstance(awaitable, types.CoroutineType):
            frame, awaitable = awaitable.cr_frame, awaitable.cr_await
        elif isinstance(awaitable, types.GeneratorType):
            frame, awaitable = awaitable.gi_frame, awaitable.gi_yieldfrom
        elif isinstance(awaitable, types.AsyncGeneratorType):
            frame, awaitable = awaitable.ag_frame, awaitable.ag_await
        elif type(awaitable).__name__ in ("async_generator_asend", "async_generator_athrow"):
            # `async for` awaits one of these; it exposes its generator only to the collector.
            awaitable = next(
                (r for r in gc.get_referents(awaitable) if isinstance(r, types.AsyncGeneratorType)),
                None,
            )
            continue
        else:  # a Future, or something else without frames: the end of the chain
            break
        if frame is None:  # finished
            break
        frames.append(frame)
    return frames


def _task_name(task: asyncio.Task) -> str:
    return task.get_name().replace("\n", "\\n")


def capture() -> list[Goroutine]:
    """Every thread and pending task now, threads first (the main thread first).

    Call it in the event loop's thread, as the handler does: the serving loop then stands still
    while its tasks are read.
    """
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    main_ident = threading.main_thread().ident
    frames_by_thread = _frames_by_thread()
    goroutines = []
    stacks_by_thread = {ident: _stack_of(frames) for ident, frames in frames_by_thread.items()}
    # Where each frame sits on a thread's stack: a running task's frames are found there.
    position: dict[int, tuple[int, int]] = {}
    for ident in sorted(frames_by_thread, key=lambda ident: (ident != main_ident, ident)):
        for index, frame in enumerate(frames_by_thread[ident]):
            position[id(frame)] = (ident, index)
        name = names.get(ident, "").replace('"', '\\"').replace("\n", "\\n")
        goroutines.append(
            Goroutine("thread", f'{ident} "{name}"', "running", stacks_by_thread[ident])
        )
    for task in pending_tasks(frames_by_thread):
        coroutine = task.get_coro()
        frames = _awaited_frames(coroutine)
        running = bool(getattr(coroutine, "cr_running", False))
        if running and frames and id(frames[0]) in position:
            ident, index = position[id(frames[0])]
            stack = stacks_by_thread[ident][: index + 1]
        else:
            stack = _stack_of(reversed(frames))
        state = "running" if running else "pending"
        goroutines.append(Goroutine("task", _task_name(task), state, stack))
    return goroutines


def count() -> int:
    """How many threads and pending tasks there are, for the index page."""
    frames_by_thread = _frames_by_thread()
    return len(frames_by_thread) + len(pending_tasks(frames_by_thread))


def count_stacks(goroutines: Iterable[Goroutine]) -> GoroutineProfile:
    return GoroutineProfile(dict(Counter(goroutine.stack for goroutine in goroutines)))


def _most_first(profile: GoroutineProfile) -> list[tuple[Stack, int]]:
    """Most common stacks first; ties in the order of their addresses, as Go sorts them."""
    return sorted(
        profile.counts.items(),
        key=lambda item: (-item[1], [address_of(frame) for frame in item[0]]),
    )


def encode(profile: GoroutineProfile) -> bytes:
    """The gzipped profile.proto: one `goroutine/count` sample per distinct stack."""
    builder = ProfileBuilder(
        sample_types=[("goroutine", "count")],
        period_type=("goroutine", "count"),
        period=1,
        time_nanos=profile.time_ns,
        duration_nanos=profile.duration_ns,
        comments=["threads and pending asyncio tasks of every event loop"],
    )
    for stack, number in _most_first(profile):
        builder.add_sample(stack, [number])
    return builder.encode()


def render_counts(profile: GoroutineProfile) -> str:
    """Go's legacy text (`debug=1`): a count and the addresses of each stack, then its frames.

    `go tool pprof` reads the `@` lines and asks the `symbol` endpoint for the addresses' names;
    the `#` lines are for people. As in Go, `@` lists return addresses (one past the call).
    """
    lines = [f"goroutine profile: total {profile.total()}"]
    for stack, number in _most_first(profile):
        lines += legacy_record(str(number), stack)
    return "\n".join(lines) + "\n"


def render_stacks(goroutines: Iterable[Goroutine]) -> str:
    """Every thread and task in full (`debug=2`), in the layout of Go's goroutine dump."""
    blocks = []
    for goroutine in goroutines:
        lines = [f"{goroutine.kind} {goroutine.title} [{goroutine.state}]:"]
        for filename, lineno in goroutine.stack:
            lines.append(f"{function_of(filename, lineno)[0]}(...)")
            lines.append(f"\t{filename}:{lineno}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
