"""HTTP handlers for /debug/pprof/, like Go's net/http/pprof: a pure ASGI app, no framework needed.

Mount it in any Starlette or FastAPI service:

    app.mount("/debug/pprof", PprofApp())

then, from a machine with Go (or the standalone `pprof`):

    go tool pprof http://localhost:8080/debug/pprof/heap               # what is in use now
    go tool pprof http://localhost:8080/debug/pprof/heap?seconds=30    # what grew in 30 s
    go tool pprof http://localhost:8080/debug/pprof/goroutine          # threads and asyncio tasks
    go tool pprof http://localhost:8080/debug/pprof/profile?seconds=30 # where the CPU time goes
    curl http://localhost:8080/debug/pprof/heap?debug=1                # Go's legacy text format
    curl http://localhost:8080/debug/pprof/goroutine?debug=2           # every stack, in full

The endpoints, as in Go:
    heap       Live memory by allocating stack: sampled when the sampler runs (below), else
               from tracemalloc.
    allocs     With the sampler only: heap's data, by default what was allocated since it
               started (alloc_space). Else 404, as Go answers for a profile it does not have.
    goroutine  Every thread's stack and every pending asyncio task's, of every event loop in the
               process: Python's goroutines. Tasks that never finish are the async leak. As in
               Go, where parked goroutines sit in runtime.gopark, `-top` shows where they wait
               (asyncio.tasks.sleep, asyncio.queues.Queue.get...); `-top -cum`, or
               `-top -hide=^asyncio`, shows whose tasks they are.
               debug=1: a count per stack, in Go's text; debug=2: every thread and task in full.
               seconds=N: the growth over N seconds (a profile; not with debug, as in Go).
    profile    CPU profile over seconds=N (default 30), sampled at 100 Hz of CPU time, each sample
               labelled with its thread (`go tool pprof -tags`). One at a time: a request while
               one runs gets 409 Conflict (Go answers 500, but nothing is broken: try later).
               Needs Linux and the event loop in the main thread, as uvicorn runs it, else 501.
    cmdline    The command line, arguments separated by NUL bytes: `sys.orig_argv`, interpreter
               and options included, since Go's os.Args is what the process was started with.
    symbol     Go's symbol lookup, for the addresses in the debug=1 texts: GET answers
               `num_symbols: 1`; a POST body (or GET query) of `+`-separated addresses answers
               `0x<address> <function>` for each one it knows, skipping the rest. `go tool pprof`
               asks it by itself when it reads a debug=1 profile over HTTP.

Query parameters, as in Go:
    debug=N    0 (default): gzipped profile.proto; 1: legacy text. Not a number counts as 0.
    gc=N       N > 0: run a full garbage collection first (heap): one at a time for all requests,
               and none for four times the last one's length after it (at least a second), so
               that clients asking in a loop cannot keep the service collecting.
    seconds=N  heap, goroutine: the growth over N seconds (at the end minus at the start);
               profile: how long to sample. Anything but a whole number of seconds from 1 to 300
               is a 400 (where Go's profile would quietly take 30 s).

With the sampling heap profiler (`asgi_pprof.start_sampling()` at startup; the service's
PPROF_HEAP_PROFILER=sampling), `heap` and `allocs` answer at once, as Go's do: one allocation per
`rate` bytes on average (PPROF_MEM_PROFILE_RATE, default 512 KiB) is recorded with its stack and
followed until freed; profiles unsample the counts. seconds=N: the growth, not with debug (400,
as in Go). No fork: built in a thread, in milliseconds. Each profile's comments and the index say
which backend answered, at what rate.

When tracemalloc is not tracing, `heap` without `seconds` waits for a default window (30 s, as Go's
CPU profile does) instead of answering an empty profile that would read as "no leak": the window
turns tracing on and, when the last window closes, off again.

Heap profiles are built in a forked copy of the process (see `forked`): the service keeps serving,
stalled only for the fork, and the profiler's own allocations never land in its heap.

Several worker processes (uvicorn --workers N, gunicorn's uvicorn worker): with PPROF_MULTIPROC_DIR
set to a directory shared by the workers, heap, allocs, goroutine and profile answer for every live
worker, merged, each sample labelled with its `pid`; a worker that does not answer in time is named
in the X-Pprof-Workers-Failed header and the profile's comments (see `multiproc`).

The profiles show file paths and the shapes of the service's memory: keep these endpoints off public
networks, or set PPROF_ENABLED=false.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from urllib.parse import parse_qsl

from asgi_pprof import (
    asgi,
    builds,
    combine,
    cpu,
    forked,
    goroutine,
    heap,
    index,
    multiproc,
    sampled_profile,
    sampling,
)
from asgi_pprof.asgi import Answer, BadRequest, Receive, Request, Scope, Send, go_int64, int_or_zero
from asgi_pprof.symbolize import frame_at, function_of

DEFAULT_WINDOW_SECONDS = 30
MAX_WINDOW_SECONDS = 300
MAX_SYMBOL_REQUEST_BYTES = 1 << 20  # about 100,000 addresses: more than any profile has
SLICE_SECONDS = 0.005  # the longest a symbol request keeps the event loop in one go
BODY_TIMEOUT_SECONDS = 10.0  # for a symbol request's body, however slowly it is sent
# With PPROF_MULTIPROC_DIR: what every worker answers (the rest is this worker's own).
FROM_EVERY_WORKER = frozenset({"allocs", "goroutine", "heap", "profile"})


class PprofApp:
    """The /debug/pprof/ endpoints. `frames` is the stack depth of on-demand tracing windows.

    `multiproc_dir`: the directory through which the workers of one service answer together
    (see `multiproc`); by default PPROF_MULTIPROC_DIR, "" for none. A bad one raises
    multiproc.MultiprocConfigError at once, naming the variable.
    """

    def __init__(
        self,
        frames: int = 8,
        default_window_seconds: int = DEFAULT_WINDOW_SECONDS,
        max_window_seconds: int = MAX_WINDOW_SECONDS,
        multiproc_dir: str | None = None,
    ) -> None:
        self.frames = frames
        self.default_window_seconds = default_window_seconds
        self.max_window_seconds = max_window_seconds
        self._builds = builds.HeapBuilds()
        self._sampled_builds = builds.SampledBuilds()
        self.handlers: dict[str, Callable[[Request], Awaitable[Answer]]] = {
            "allocs": self.allocs,
            "cmdline": self.cmdline,
            "goroutine": self.goroutine,
            "heap": self.heap,
            "profile": self.profile,
            "symbol": self.symbol,
        }
        environ = os.environ if multiproc_dir is None else {multiproc.DIR_VARIABLE: multiproc_dir}
        directory = multiproc.directory_from_environ(environ)
        self.workers = None
        if directory is not None:
            timeout = multiproc.timeout_from_environ()
            self.workers = multiproc.Workers(directory, self.answer_here, timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.workers is not None and threading.current_thread() is threading.main_thread():
            self.workers.note_serving_loop(asyncio.get_running_loop())
        await self._serve(scope, receive, send, every_worker=self.workers is not None)

    async def answer_here(self, scope: Scope, receive: Receive, send: Send) -> None:
        """This worker's own answer, whatever PPROF_MULTIPROC_DIR says: what its socket serves."""
        await self._serve(scope, receive, send, every_worker=False)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, every_worker: bool) -> None:
        if scope["type"] != "http":
            return
        path = asgi.route_path(scope)
        if path == "":  # the mount point without its slash: the index's relative links need it
            await asgi.send_answer(_redirect_to(scope["path"] + "/", scope), scope, send)
            return
        answer = await self._answer(path.strip("/"), scope, receive, every_worker)
        if answer is not None:  # None: the client has gone, and what it asked for was stopped
            await asgi.send_answer(answer, scope, send)

    async def _answer(
        self, name: str, scope: Scope, receive: Receive, every_worker: bool
    ) -> Answer | None:
        methods = ("GET", "HEAD", "POST") if name == "symbol" else ("GET", "HEAD")
        if scope["method"] not in methods:
            answer = asgi.error(405, "Method not allowed")
            answer.headers.append(("allow", ", ".join(methods)))
            return answer
        if name == "":
            return self.index()
        if name not in self.handlers:
            return asgi.error(404, "Unknown profile")
        body = b""
        if scope["method"] == "POST":
            try:
                body = await asgi.read_body(
                    scope, receive, MAX_SYMBOL_REQUEST_BYTES, BODY_TIMEOUT_SECONDS
                )
            except asgi.BodyTooLarge:
                return asgi.error(413, f"Request body larger than {MAX_SYMBOL_REQUEST_BYTES} bytes")
            except asgi.BodyTooSlow:
                return asgi.error(408, f"Request body not received in {BODY_TIMEOUT_SECONDS:g} s")
        raw_query = scope.get("query_string", b"").decode("latin-1")
        # Kept blank: `seconds=` is a bad value (400), not an absent one.
        pairs = parse_qsl(raw_query, keep_blank_values=True)
        request = Request(scope["method"], asgi.first_values(pairs), raw_query, body)
        if every_worker and name in FROM_EVERY_WORKER:
            work = self._from_every_worker(name, request)
        else:
            work = self._handle(name, request)
        try:
            return await asgi.unless_disconnected(work, receive)
        except BadRequest as bad:
            return asgi.error(400, str(bad))

    async def _handle(self, name: str, request: Request) -> Answer:
        try:
            return await self.handlers[name](request)
        except BadRequest as bad:
            return asgi.error(400, str(bad))
        except forked.ChildFailed as failed:  # out of memory, too slow: the service goes on
            return asgi.error(503, str(failed))

    async def _from_every_worker(self, name: str, request: Request) -> Answer:
        """Every worker's answer, merged (see `multiproc`); each runs `seconds` windows itself."""
        assert self.workers is not None
        seconds = self._seconds(request.query)  # a bad value: a 400 before any worker is asked
        if seconds is None and name == "profile":
            seconds = self.default_window_seconds
        elif seconds is None and name == "heap" and not sampling.is_running():
            seconds = 0 if tracemalloc.is_tracing() else self.default_window_seconds
        target = f"/{name}" + (f"?{request.raw_query}" if request.raw_query else "")
        gathered = await self.workers.gather(target, seconds or 0, self._handle(name, request))
        return await asyncio.to_thread(
            _combine, gathered.answers, gathered.failures, gathered.notes
        )

    def _seconds(self, query: dict[str, str]) -> int | None:
        """The `seconds` parameter: absent is None; anything but 1..max is a 400, as in Go."""
        if "seconds" not in query:
            return None
        seconds = go_int64(query["seconds"])
        if seconds is None or seconds <= 0:
            raise BadRequest('invalid value for "seconds" - must be a positive integer')
        if seconds > self.max_window_seconds:
            raise BadRequest(
                f'invalid value for "seconds" - must be at most {self.max_window_seconds}'
            )
        return seconds

    async def heap(self, request: Request) -> Answer:
        """In-use memory by allocating stack, sampled if the sampler runs, else from tracemalloc;
        `seconds=N` for the growth."""
        if sampling.is_running():
            return await self._sampled(request, "heap")
        query = request.query
        seconds = self._seconds(query)
        if seconds is None and not tracemalloc.is_tracing():
            seconds = self.default_window_seconds
        collect_first = int_or_zero(query.get("gc", "")) > 0
        debug = int_or_zero(query.get("debug", ""))
        if seconds is None:
            if collect_first:
                builds.collect_garbage()
            # Requests that arrive while the same profile is being built share its answer.
            work = partial(heap.build, debug=debug)
            built = await self._builds.shared((debug, collect_first), work)
        else:
            with heap.tracing_window(self.frames) as traced_before:
                start = await self._window_start(traced_before)
                # The window runs from the start's capture: the seconds its build took count.
                taken_ns = time.time_ns() - start.time_ns
                await asyncio.sleep(max(0.0, seconds - taken_ns / 1e9))
                if collect_first:
                    builds.collect_garbage()
                built = await self._builds.alone(partial(heap.build, debug=debug, start=start))
        payload = heap.open_answer(built)
        return asgi.text(payload) if debug > 0 else asgi.profile("heap", payload)

    async def allocs(self, request: Request) -> Answer:
        """Allocations since the sampler started; without it, unknown (Go's 404)."""
        if not sampling.is_running():
            return asgi.error(404, "Unknown profile")
        return await self._sampled(request, "allocs")

    async def _sampled(self, request: Request, name: str) -> Answer:
        """`heap` or `allocs` from the sampler, built in a thread: no fork, no wait."""
        seconds = self._seconds(request.query)
        debug = int_or_zero(request.query.get("debug", ""))
        if seconds is not None and debug != 0:
            raise BadRequest("seconds and debug params are incompatible")
        collect_first = int_or_zero(request.query.get("gc", "")) > 0
        if collect_first:
            builds.collect_garbage()
        if seconds is None:
            if debug > 0:
                text = await self._sampled_builds.shared(("text",), _sampled_text)
                return asgi.text(text)
            built = await self._sampled_builds.shared(name, partial(_sampled_profile, name))
            return asgi.profile(name, built)
        start = await self._sampled_builds.alone(sampling.capture)
        await asyncio.sleep(seconds)
        if collect_first:
            builds.collect_garbage()
        end = await self._sampled_builds.alone(sampling.capture)
        growth = await self._sampled_builds.alone(partial(sampled_profile.build, end, name, start))
        return asgi.profile(f"{name}-delta", growth)

    async def _window_start(self, traced_before: bool) -> heap.HeapProfile:
        """What is in use as a heap window opens; nothing yet if the window just started tracing."""
        if not traced_before:
            return heap.HeapProfile({}, self.frames)
        return heap.HeapProfile.from_bytes(await self._builds.alone(_heap_snapshot))

    async def goroutine(self, request: Request) -> Answer:
        """Every thread and pending asyncio task by stack; `seconds=N` for the growth."""
        seconds = self._seconds(request.query)
        debug = int_or_zero(request.query.get("debug", ""))
        # Captured here, in the event loop's thread, so that the loop's tasks stand still.
        if seconds is not None:
            if debug != 0:
                raise BadRequest("seconds and debug params are incompatible")
            start = goroutine.count_stacks(goroutine.capture())
            await asyncio.sleep(seconds)
            growth = goroutine.count_stacks(goroutine.capture()).minus(start)
            return asgi.profile(
                "goroutine-delta", await asyncio.to_thread(goroutine.encode, growth)
            )
        goroutines = goroutine.capture()
        if debug >= 2:
            return asgi.text(await asyncio.to_thread(goroutine.render_stacks, goroutines))
        profile = goroutine.count_stacks(goroutines)
        if debug == 1:
            return asgi.text(await asyncio.to_thread(goroutine.render_counts, profile))
        return asgi.profile("goroutine", await asyncio.to_thread(goroutine.encode, profile))

    async def profile(self, request: Request) -> Answer:
        """A CPU profile of the next `seconds` (default 30), while the service goes on."""
        seconds = self._seconds(request.query) or self.default_window_seconds
        try:
            profile = await cpu.profile_for(seconds)
        except cpu.ProfilingInUse as error:
            return asgi.error(409, f"Could not enable CPU profiling: {error}")
        except cpu.ProfilingUnavailable as error:
            return asgi.error(501, f"Could not enable CPU profiling: {error}")
        return asgi.profile("profile", await asyncio.to_thread(cpu.encode, profile))

    async def cmdline(self, request: Request) -> Answer:
        """The command line, NUL-separated, in the bytes the process was given."""
        argv = b"\x00".join(os.fsencode(argument) for argument in sys.orig_argv)
        return Answer(
            200, argv, "text/plain; charset=utf-8", [("x-content-type-options", "nosniff")]
        )

    async def symbol(self, request: Request) -> Answer:
        """Go's symbol lookup: `+`-separated addresses in, `0x<address> <function>` lines out."""
        words = request.body if request.method == "POST" else request.raw_query.encode("latin-1")
        # pprof only cares whether the count is 0 (no symbols at all), as Go's comment says.
        lines = ["num_symbols: 1"]
        # A megabyte of addresses takes seconds while tracemalloc traces every allocation: the
        # event loop gets its turn every SLICE_SECONDS.
        slice_ends = time.perf_counter() + SLICE_SECONDS
        for word in _split(words, b"+"):
            address = _address(word)
            name = _name_at(address) if address else None
            if name is not None:
                lines.append(f"{address:#x} {name}")
            if time.perf_counter() > slice_ends:
                await asyncio.sleep(0)
                slice_ends = time.perf_counter() + SLICE_SECONDS
        return asgi.text("\n".join(lines) + "\n")

    def index(self) -> Answer:
        workers = None
        if self.workers is not None:
            workers = self.workers.directory, self.workers.pids()
        return index.page(self.default_window_seconds, workers)


def _combine(
    answers: list[tuple[int, Answer]], failures: list[tuple[int, str]], notes: list[str]
) -> Answer:
    with sampling.collection_paused():  # as a profile's build: no collection of the whole heap
        return combine.combine(answers, failures, notes)


def _redirect_to(path: str, scope: Scope) -> Answer:
    query = scope.get("query_string", b"").decode("latin-1")
    location = path + (f"?{query}" if query else "")
    return Answer(301, b"", "text/plain; charset=utf-8", [("location", location)])


def _name_at(address: int) -> str | None:
    """The function at a fake address of a legacy text: the sampler's, or a traced frame's."""
    location = sampling.location_at(address)
    if location is not None:
        return location.name
    frame = frame_at(address)
    return function_of(*frame)[0] if frame is not None else None


def _split(data: bytes, separator: bytes) -> Iterator[bytes]:
    """`data.split(separator)` a word at a time: one split() of a megabyte is a single call that
    holds the event loop for seconds while tracemalloc traces."""
    start = 0
    while (end := data.find(separator, start)) >= 0:
        yield data[start:end]
        start = end + len(separator)
    yield data[start:]


def _address(word: bytes) -> int:
    """An address as Go's strconv.ParseUint(word, 0, 64) reads it; 0 if it is not one."""
    try:
        address = int(word.decode("ascii"), 0)
    except (UnicodeDecodeError, ValueError):
        return 0
    return address if 0 < address < 1 << 64 else 0


def _sampled_profile(name: str) -> bytes:
    return sampled_profile.build(sampling.capture(), name)


def _sampled_text() -> str:
    return sampled_profile.render_text(sampling.capture())


def _heap_snapshot(in_child: bool) -> bytes:
    return heap.capture(in_child).to_bytes()
