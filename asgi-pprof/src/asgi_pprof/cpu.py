"""CPU profiles, like Go's runtime/pprof CPU profile: stacks sampled at 100 Hz of CPU time.

How a sample is taken. `setitimer(ITIMER_PROF)` makes the kernel send SIGPROF each time the process
has used another 10 ms of CPU time, in any of its threads, to the thread that was using it. Python
runs signal handlers in the main thread only, at the next bytecode, so:

- the main thread (the event loop's, under uvicorn) is sampled exactly: when the signal finds it
  running, the handler interrupts it and the handler's `frame` is where it was;
- each thread, the main one included, is charged the CPU time it really used, read from its own
  Linux CPU clock: a sample for each whole 10 ms it used since the previous handler, at its stack
  then (`sys._current_frames()`). A thread asleep in C uses no CPU time and is never charged,
  unlike a naive sampler that would count every thread's stack on every tick. Threads started
  during the profile are learnt at the next signal.

Other threads are sampled when the main thread runs the handler, which needs the GIL: the thread
using the CPU holds it, and gives it up at the next switch interval or sooner, when it blocks. So
that they are caught computing, not blocked, while profiling: the event loop is woken by each
signal (Python's wakeup fd), instead of running the handler whenever it next wakes up; and the
switch interval is 0.5 ms instead of 5. Measured on a thread computing 5 ms then sleeping 5 ms:
10-25% of its samples land on the sleep (none should), against 75-97% without both measures.
The shorter interval costs only where threads compete for the GIL, and only while profiling.

Samples carry a `thread` label (`go tool pprof -tags`, `-tagfocus=thread=MainThread`). A comment
in the profile says what sampling cost: the main thread's CPU time spent in the handler.
Signal handlers can only be set in the main thread, so `start` refuses anywhere else; one profile
runs at a time, as in Go. Needs Linux: per-thread CPU clocks are Linux's.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from asgi_pprof.profile import ProfileBuilder
from asgi_pprof.symbolize import Frame

DEFAULT_HZ = 100  # Go's rate: frequent enough, cheap enough, and 1 sample = 10 ms
MAX_DEPTH = 128  # frames kept per sample, leaf first (Go keeps 64; Python stacks run deeper)
_SWITCH_INTERVAL_SECONDS = 0.0005  # while profiling (see the module's doc comment)

Stack = tuple[Frame, ...]  # leaf first
# Named "thread exited" in pprof, as Go names samples it cannot place (runtime._LostExternalCode).
_THREAD_EXITED: Stack = (("<thread exited>", 0),)


class ProfilingInUse(Exception):
    """Another CPU profile is being taken (or another profiler holds ITIMER_PROF)."""


class ProfilingUnavailable(Exception):
    """This process or platform cannot take CPU profiles."""


@dataclass
class CPUProfile:
    samples: dict[tuple[str, Stack], int]  # (thread name, stack) -> samples
    period_ns: int
    time_ns: int
    duration_ns: int
    handler_calls: int = 0  # what sampling cost: how often the handler ran...
    handler_ns: int = 0  # ...and the main thread's CPU time in it


def _thread_cpu_clock(native_id: int) -> int:
    """The clock id of a thread's CPU time, made as glibc's pthread_getcpuclockid makes it.

    From the kernel's thread id, not the pthread handle: reading the clock of a thread that has
    ended fails cleanly (EINVAL) instead of touching freed memory.
    """
    return (~native_id << 3) | 6  # CPUCLOCK_PERTHREAD_MASK | CPUCLOCK_SCHED


# What the handler records of a frame: its code (by id) and the offset of its instruction. Reading
# `f_lineno` instead would cost the handler 8 times as much: it decodes the line table.
RawStack = tuple[tuple[int, int], ...]


def _line_of(code: types.CodeType, offset: int) -> int:
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line if line is not None else code.co_firstlineno
    return code.co_firstlineno


@dataclass(frozen=True)
class _Thread:
    name: str
    clock: int


_lock = threading.Lock()
_active: CPUProfiler | None = None


class CPUProfiler:
    """One CPU profile: `start`, let it run, `stop` for the samples. Main thread only."""

    def __init__(self, hz: int = DEFAULT_HZ) -> None:
        self.period_ns = 1_000_000_000 // hz
        self._samples: Counter[tuple[str, RawStack | None]] = Counter()  # None: thread exited
        self._codes: dict[int, types.CodeType] = {}  # the codes of the raw stacks, kept alive
        self._threads: dict[int, _Thread] = {}  # by threading ident
        self._cpu_seen: dict[int, int] = {}  # by clock: its reading at the previous handler
        self._cpu_unsampled: dict[int, int] = {}  # by clock: CPU used, not yet in a sample
        self._running = False
        self._in_handler = False
        self._handler_calls = 0
        self._handler_ns = 0
        self._previous_handler: object = None
        self._started_ns = 0
        self._started_monotonic_ns = 0
        self._main_ident = threading.main_thread().ident

    def start(self) -> None:
        global _active
        with _lock:
            if _active is not None:
                raise ProfilingInUse("cpu profiling already in use")
            if not sys.platform.startswith("linux"):
                raise ProfilingUnavailable("needs Linux's per-thread CPU clocks")
            if threading.current_thread() is not threading.main_thread():
                raise ProfilingUnavailable(
                    "SIGPROF handlers can only be set in the main thread, and the event loop "
                    "serving this request runs in another one"
                )
            if signal.getitimer(signal.ITIMER_PROF) != (0.0, 0.0):
                raise ProfilingInUse("another profiler in this process is using ITIMER_PROF")
            self._threads = {
                thread.ident: _Thread(thread.name, _thread_cpu_clock(thread.native_id))
                for thread in threading.enumerate()
                if thread.ident is not None and thread.native_id is not None
            }
            for thread in self._threads.values():  # count only what is used from now on
                self._cpu_seen[thread.clock] = self._read_clock(thread.clock) or 0
            self._previous_handler = signal.signal(signal.SIGPROF, self._on_signal)
            signal.siginterrupt(signal.SIGPROF, False)  # restart system calls it interrupts
            self._started_ns = time.time_ns()
            self._started_monotonic_ns = time.monotonic_ns()
            self._running = True
            interval = self.period_ns / 1e9
            signal.setitimer(signal.ITIMER_PROF, interval, interval)
            _active = self

    def stop(self) -> CPUProfile:
        global _active
        self._running = False
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        previous = self._previous_handler
        if callable(previous) or previous == signal.SIG_IGN:
            signal.signal(signal.SIGPROF, previous)
        else:
            # A SIGPROF sent just before the timer stopped may still arrive: its default action
            # would end the process, so a handler that ignores it stays.
            signal.signal(signal.SIGPROF, _ignore)
        with _lock:
            _active = None
        return CPUProfile(
            self._resolved_samples(),
            self.period_ns,
            self._started_ns,
            time.monotonic_ns() - self._started_monotonic_ns,
            self._handler_calls,
            self._handler_ns,
        )

    def _learn_thread(self, ident: int) -> None:
        """A thread started during the profile: all its CPU time is the profile's.

        `threading.enumerate()` would take a lock that the code this handler interrupted may be
        holding; the dict it reads, `threading._active`, can be read without it.
        """
        thread = getattr(threading, "_active", {}).get(ident)
        if thread is not None and thread.native_id is not None:
            self._threads[ident] = _Thread(thread.name, _thread_cpu_clock(thread.native_id))

    def _resolved_samples(self) -> dict[tuple[str, Stack], int]:
        lines: dict[tuple[int, int], Frame] = {}
        samples: Counter[tuple[str, Stack]] = Counter()
        for (thread, raw_stack), number in self._samples.items():
            if raw_stack is None:
                samples[thread, _THREAD_EXITED] += number
                continue
            stack = []
            for code_id, offset in raw_stack:
                frame = lines.get((code_id, offset))
                if frame is None:
                    code = self._codes[code_id]
                    frame = lines[code_id, offset] = (code.co_filename, _line_of(code, offset))
                stack.append(frame)
            samples[thread, tuple(stack)] += number
        return dict(samples)

    def _raw_stack(self, frame: types.FrameType | None) -> RawStack:
        codes = self._codes
        raw_stack = []
        while frame is not None and len(raw_stack) < MAX_DEPTH:
            code = frame.f_code
            codes[id(code)] = code
            raw_stack.append((id(code), frame.f_lasti))
            frame = frame.f_back
        return tuple(raw_stack)

    @staticmethod
    def _read_clock(clock: int) -> int | None:
        try:
            return time.clock_gettime_ns(clock)
        except OSError:  # the thread has ended
            return None

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        if not self._running or self._in_handler:  # a signal can interrupt its own handler
            return
        self._in_handler = True
        started = time.thread_time_ns()
        try:
            self._sample(frame)
        finally:
            self._handler_ns += time.thread_time_ns() - started
            self._handler_calls += 1
            self._in_handler = False

    def _sample(self, main_frame: types.FrameType | None) -> None:
        frames = sys._current_frames()
        for ident in frames.keys() - self._threads.keys():
            self._learn_thread(ident)
        for ident, thread in list(self._threads.items()):
            cpu = self._read_clock(thread.clock)
            if cpu is None:  # ended: forget it, its ident may be given to a new thread
                del self._threads[ident]
                continue
            used = cpu - self._cpu_seen.get(thread.clock, 0)
            self._cpu_seen[thread.clock] = cpu
            samples, unsampled = divmod(
                self._cpu_unsampled.get(thread.clock, 0) + used, self.period_ns
            )
            self._cpu_unsampled[thread.clock] = unsampled
            if samples:
                # The main thread's frame in `frames` is this handler; `main_frame` is what it
                # interrupted. A thread may have finished its Python code since it used the CPU.
                frame = main_frame if ident == self._main_ident else frames.get(ident)
                raw_stack = self._raw_stack(frame) if frame is not None else None
                self._samples[thread.name, raw_stack] += samples


def in_use() -> bool:
    """Whether a CPU profile is being taken now."""
    return _active is not None


def _ignore(signum: int, frame: types.FrameType | None) -> None:
    pass


async def profile_for(seconds: float, hz: int = DEFAULT_HZ) -> CPUProfile:
    """A CPU profile of the next `seconds`, waiting without blocking the event loop.

    Raises ProfilingInUse or ProfilingUnavailable when it cannot start.
    """
    profiler = CPUProfiler(hz)
    profiler.start()
    try:
        loop = asyncio.get_running_loop()
        with _sampling_promptly(loop):
            await asyncio.sleep(seconds)
    finally:
        profile = profiler.stop()
    return profile


@contextmanager
def _sampling_promptly(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Run the handler soon after each signal, while the sampled thread still computes.

    A SIGPROF sent to another thread (the one using the CPU) does not interrupt the main thread
    waiting for I/O: Python's wakeup fd, written at each signal and watched by the loop, ends the
    wait. If one is set already (asyncio sets one for `loop.add_signal_handler`), it wakes its
    loop the same way and we leave it alone. Then the handler waits for the GIL at most one switch
    interval, so we shorten it.
    """
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    if previous_fd != -1:
        signal.set_wakeup_fd(previous_fd)
    else:
        loop.add_reader(reader.fileno(), _drain, reader)
    previous_interval = sys.getswitchinterval()
    sys.setswitchinterval(_SWITCH_INTERVAL_SECONDS)
    try:
        yield
    finally:
        if sys.getswitchinterval() == _SWITCH_INTERVAL_SECONDS:  # unless changed meanwhile
            sys.setswitchinterval(previous_interval)
        if previous_fd == -1:
            signal.set_wakeup_fd(-1)
            loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()


def _drain(reader: socket.socket) -> None:
    try:
        while reader.recv(4096):
            pass
    except BlockingIOError:
        pass


def encode(profile: CPUProfile) -> bytes:
    """The gzipped profile.proto: `samples/count` and `cpu/nanoseconds`, as Go writes them."""
    builder = ProfileBuilder(
        sample_types=[("samples", "count"), ("cpu", "nanoseconds")],
        period_type=("cpu", "nanoseconds"),
        period=profile.period_ns,
        time_nanos=profile.time_ns,
        duration_nanos=profile.duration_ns,
        comments=[
            f"sampling: {profile.handler_calls} signals handled in "
            f"{profile.handler_ns / 1e6:.1f} ms of the main thread's CPU time"
        ],
    )
    by_samples = sorted(profile.samples.items(), key=lambda item: item[1], reverse=True)
    for (thread, stack), samples in by_samples:
        builder.add_sample(stack, [samples, samples * profile.period_ns], {"thread": thread})
    return builder.encode()
