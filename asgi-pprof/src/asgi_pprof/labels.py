"""Labels on sampled allocations: which route, method, thread and task allocated, as Go's
`pprof.Do` labels a goroutine's samples, for `go tool pprof -tagfocus=http.route=/orders`.

    app = LabelMiddleware(app)                 # every request: http.route and http.method
    with labelled(tenant="acme"):              # this block: tenant=acme, on top of the above
        ...

Labels ride in a context variable, so they follow a request through its awaits and into the
tasks it starts (asyncio copies the context into each new task), as Go's labels follow a
goroutine into the goroutines it starts. The sampler reads the variable only when it samples an
allocation (one allocation in 512 KiB): the common path pays nothing. It reads a number that
stands for the label set; sets are numbered here, at most MAX_LABEL_SETS of them, after which
new sets share one that says so. `http.route` is the route's template (`/orders/{id}`, as
OpenTelemetry names it), never the raw path: the sets stay as few as the service's routes.

The thread comes from the sampler, which numbers each thread (a serial: the OS reuses thread
idents); its name is read from `threading` while it lives, at each profile built, and remembered
(a thread that ended before any profile is named `thread #N`). A task's
name is a label where labels are set (the middleware, `labelled`) inside a task that has a name
of its own: asyncio's default `Task-N` names one task only, and is left out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from asgi_pprof.asgi import ASGIApp, Receive, Scope, Send

MAX_LABEL_SETS = 4096
TOO_MANY = (("labels", f"more than {MAX_LABEL_SETS} label sets"),)
MAX_REMEMBERED_PATHS = 1024
MAX_REMEMBERED_THREADS = 1024

LabelSet = tuple[tuple[str, str], ...]  # sorted (key, value) pairs

# The label set of the running code, by number: what the sampler reads (see sampling.start).
label_set_number: ContextVar[int] = ContextVar("asgi_pprof.label_set", default=0)
_sets: list[LabelSet] = [()]
_numbers: dict[LabelSet, int] = {(): 0}
_lock = threading.Lock()


def number_of(pairs: dict[str, str]) -> int:
    """The number of a label set, numbered on first sight; past the limit, TOO_MANY's."""
    key = tuple(sorted(pairs.items()))
    number = _numbers.get(key)
    if number is None:
        with _lock:
            number = _numbers.get(key)
            if number is None:
                if len(_sets) >= MAX_LABEL_SETS:
                    key = TOO_MANY
                    number = _numbers.get(key)
                if number is None:
                    number = _numbers[key] = len(_sets)
                    _sets.append(key)
    return number


def label_set(number: int) -> dict[str, str]:
    """The labels of set `number`."""
    return dict(_sets[number]) if 0 <= number < len(_sets) else {}


def current() -> dict[str, str]:
    """The labels of the running code."""
    return label_set(label_set_number.get())


def _task_name() -> str | None:
    """The running task's name, if it has one of its own (not asyncio's default Task-N)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop here
        return None
    if task is None:
        return None
    name = task.get_name()
    if name.startswith("Task-") and name[5:].isdigit():
        return None
    return name


@contextmanager
def labelled(**labels: str) -> Iterator[None]:
    """Label the allocations of this block (and of the tasks it starts), on top of the labels
    already set, like Go's pprof.Do. Values are strings; in a named task, `task` is its name."""
    pairs = current()
    task = _task_name()
    if task is not None:
        pairs["task"] = task
    pairs.update((key, str(value)) for key, value in labels.items())
    token = label_set_number.set(number_of(pairs))
    try:
        yield
    finally:
        label_set_number.reset(token)


RouteOf = Callable[[Scope], "str | None"]


def starlette_route(scope: Scope, app: object = None) -> str | None:
    """The template of the Starlette or FastAPI route a request goes to, as OpenTelemetry's
    Starlette instrumentation finds it (a Mount's prefix for what it mounts); None when no
    route matches, or the app has no routes."""
    router = scope.get("app", app)
    routes = getattr(router, "routes", None)
    if routes is None:
        routes = getattr(app, "routes", None)
    if not routes:
        return None
    partial = None
    for route in routes:
        matches = getattr(route, "matches", None)
        if matches is None:
            continue
        match, _ = matches(scope)
        if match.value == 2:  # Match.FULL
            return str(route.path)
        if match.value == 1 and partial is None:  # Match.PARTIAL: another method
            partial = str(route.path)
    return partial


class LabelMiddleware:
    """Labels each HTTP request's sampled allocations with `http.route` (its route's template)
    and `http.method`, in FastAPI, Starlette (routes found as OpenTelemetry finds them) or any
    ASGI app (`route_of(scope)` names the route; without it, no route label: never the raw
    path). Add it outermost, so that what the other middlewares allocate is labelled too:

        app.add_middleware(LabelMiddleware)    # FastAPI, Starlette: added last, runs first
        app = LabelMiddleware(app)             # any ASGI app
    """

    def __init__(self, app: ASGIApp, route_of: RouteOf | None = None) -> None:
        self.app = app
        self.route_of = route_of
        # By the labels around, method, root path and path.
        self._numbers: dict[tuple[int, str, str, str], int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = label_set_number.set(self._number(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            label_set_number.reset(token)

    def _number(self, scope: Scope) -> int:
        method: str = scope.get("method", "")
        around = label_set_number.get()
        key = (around, method, scope.get("root_path", ""), scope.get("path", ""))
        number = self._numbers.get(key)
        if number is None:
            pairs = label_set(around)
            pairs["http.method"] = method
            route = self.route_of(scope) if self.route_of else starlette_route(scope, self.app)
            if route is not None:
                pairs["http.route"] = route
            task = _task_name()
            if task is not None:
                pairs["task"] = task
            number = number_of(pairs)
            if task is None:  # a task's name is its own: not remembered for the path
                if len(self._numbers) >= MAX_REMEMBERED_PATHS:
                    self._numbers.clear()  # raw paths are many: keep the memory bounded
                self._numbers[key] = number
        return number


_thread_names: dict[int, str] = {}  # by the sampler's serial


def thread_names(serials: set[int], live: list[tuple[int, int]]) -> dict[int, str]:
    """Names of the sampler's threads by serial: `live` pairs each living one's serial with
    its ident, which `threading` names; the others' names are remembered from earlier calls."""
    names = {thread.ident: thread.name for thread in threading.enumerate() if thread.ident}
    for serial, ident in live:
        if ident in names:
            _thread_names.pop(serial, None)
            _thread_names[serial] = names[ident]  # most recently seen last
    while len(_thread_names) > MAX_REMEMBERED_THREADS:
        del _thread_names[next(iter(_thread_names))]
    return {serial: _thread_names.get(serial, f"thread #{serial}") for serial in serials}
