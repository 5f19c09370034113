"""HTTP handlers for /debug/pprof/, like Go's net/http/pprof: a pure ASGI app, no framework needed.

Mount it in any Starlette or FastAPI service:

    app.mount("/debug/pprof", PprofApp())

then, from a machine with Go (or the standalone `pprof`):

    go tool pprof http://localhost:8080/debug/pprof/heap              # what is in use now
    go tool pprof http://localhost:8080/debug/pprof/heap?seconds=30   # what grew in 30 s
    curl http://localhost:8080/debug/pprof/heap?debug=1               # Go's legacy text format

Query parameters, as in Go:
    debug=N    0 (default): gzipped profile.proto; 1: legacy text. Not a number counts as 0.
    gc=N       N > 0: run a full garbage collection first.
    seconds=N  the growth over N seconds (in use at the end minus in use at the start).

When tracemalloc is not tracing, `heap` without `seconds` waits for a default window (30 s, as Go's
CPU profile does) instead of answering an empty profile that would read as "no leak": the window
turns tracing on and, when the last window closes, off again.

The profiles show file paths and the shapes of the service's memory: keep these endpoints off public
networks, or set PPROF_ENABLED=false.
"""

from __future__ import annotations

import asyncio
import gc
import html
import tracemalloc
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from app.pprof import heap

Scope = dict  # ASGI's scope, receive and send, without importing a framework for their types
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

DEFAULT_WINDOW_SECONDS = 30
MAX_WINDOW_SECONDS = 300


class BadRequest(Exception):
    """Bad input: the message is the 400 body."""


class Answer:
    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = [("content-type", content_type), *(headers or [])]


def _error(status: int, message: str) -> Answer:
    # Go's serveError: plain text, with X-Go-Pprof so `go tool pprof` prints the message.
    return Answer(status, message.encode(), "text/plain; charset=utf-8", [("x-go-pprof", "1")])


def _profile(name: str, body: bytes) -> Answer:
    return Answer(
        200,
        body,
        "application/octet-stream",
        [
            ("content-disposition", f'attachment; filename="{name}"'),
            ("x-content-type-options", "nosniff"),
        ],
    )


def _text(body: str) -> Answer:
    return Answer(
        200, body.encode(), "text/plain; charset=utf-8", [("x-content-type-options", "nosniff")]
    )


def _int_or_zero(value: str) -> int:
    """Go's strconv.Atoi as net/http/pprof uses it for debug and gc: anything else is 0."""
    try:
        return int(value, 10)
    except ValueError:
        return 0


class PprofApp:
    """The /debug/pprof/ endpoints. `frames` is the stack depth of on-demand tracing windows."""

    def __init__(
        self,
        frames: int = 16,
        default_window_seconds: int = DEFAULT_WINDOW_SECONDS,
        max_window_seconds: int = MAX_WINDOW_SECONDS,
    ) -> None:
        self.frames = frames
        self.default_window_seconds = default_window_seconds
        self.max_window_seconds = max_window_seconds
        self.handlers: dict[str, Callable[[dict[str, str]], Awaitable[Answer]]] = {
            "heap": self.heap,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        name = _route_path(scope).strip("/")
        if scope["method"] not in ("GET", "HEAD"):
            answer = _error(405, "Method not allowed")
            answer.headers.append(("allow", "GET, HEAD"))
        elif name == "":
            answer = self.index()
        elif name not in self.handlers:
            answer = _error(404, "Unknown profile")
        else:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            try:
                answer = await self.handlers[name](query)
            except BadRequest as error:
                answer = _error(400, str(error))
        await _send(answer, scope, send)

    def _seconds(self, query: dict[str, str]) -> int | None:
        """The `seconds` parameter: absent is None; anything but 1..max is a 400, as in Go."""
        if "seconds" not in query:
            return None
        text = query["seconds"]
        if not (text.isascii() and text.isdigit()) or int(text) <= 0:
            raise BadRequest('invalid value for "seconds" - must be a positive integer')
        if int(text) > self.max_window_seconds:
            raise BadRequest(
                f'invalid value for "seconds" - must be at most {self.max_window_seconds}'
            )
        return int(text)

    async def heap(self, query: dict[str, str]) -> Answer:
        """In-use memory by allocating stack, from tracemalloc; `seconds=N` for the growth."""
        seconds = self._seconds(query)
        if seconds is None and not tracemalloc.is_tracing():
            seconds = self.default_window_seconds
        if _int_or_zero(query.get("gc", "")) > 0:
            gc.collect()
        if seconds is None:
            profile = await asyncio.to_thread(heap.capture)
        else:
            with heap.tracing_window(self.frames):
                start = await asyncio.to_thread(heap.capture)
                await asyncio.sleep(seconds)
                if _int_or_zero(query.get("gc", "")) > 0:
                    gc.collect()
                profile = (await asyncio.to_thread(heap.capture)).minus(start)
        if _int_or_zero(query.get("debug", "")) > 0:
            return _text(await asyncio.to_thread(heap.render_text, profile))
        return _profile("heap", await asyncio.to_thread(heap.encode, profile))

    def index(self) -> Answer:
        rows = "".join(
            f"<tr><td>{html.escape(count)}</td><td><a href='{name}?debug=1'>{name}</a></td></tr>\n"
            for name, count, _ in self._profiles()
        )
        descriptions = "".join(
            f"<li><div class=profile-name>{name}: </div> {html.escape(text)}</li>\n"
            for name, _, text in self._profiles()
        )
        page = _INDEX_PAGE.format(rows=rows, descriptions=descriptions)
        return Answer(200, page.encode(), "text/html; charset=utf-8")

    def _profiles(self) -> list[tuple[str, str, str]]:
        """(name, count, description) for each profile this process can really provide."""
        if tracemalloc.is_tracing():
            traced = tracemalloc.get_traced_memory()[0]
            count = f"{traced / 2**20:.1f} MiB"
            status = (
                f"Tracing now, {tracemalloc.get_traceback_limit()} frames deep: heap shows every "
                "live block allocated since tracing started."
            )
        else:
            count = "off"
            status = (
                "Not tracing now: heap opens a window (seconds=N, default "
                f"{self.default_window_seconds}) that traces while it lasts."
            )
        return [
            (
                "heap",
                count,
                "Live memory by allocating stack, from tracemalloc: exact, not sampled. Specify "
                "the gc GET parameter to collect garbage first, seconds=N for the growth over N "
                f"seconds. {status}",
            )
        ]


def _route_path(scope: Scope) -> str:
    """The path below the mount point, whether the framework strips the prefix or not."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :]
    return path


async def _send(answer: Answer, scope: Scope, send: Send) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    body = b"" if scope["method"] == "HEAD" else answer.body
    await send({"type": "http.response.body", "body": body})


_INDEX_PAGE = """<html>
<head>
<title>/debug/pprof/</title>
<style>
.profile-name{{
\tdisplay:inline-block;
\twidth:6rem;
}}
</style>
</head>
<body>
/debug/pprof/<br>
<br>
Types of profiles available:
<table>
<thead><td>Count</td><td>Profile</td></thead>
{rows}</table>
<br>
<p>
Profile Descriptions:
<ul>
{descriptions}</ul>
</p>
<p>Read them with <code>go tool pprof http://HOST/debug/pprof/heap</code>. Keep these endpoints off
public networks: they show file paths and the shapes of this service's memory.</p>
</body>
</html>
"""
