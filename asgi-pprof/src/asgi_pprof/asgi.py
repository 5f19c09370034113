"""The ASGI plumbing under the handlers: requests in, answers out, Go's way of parsing numbers.

Pure ASGI, no framework: a scope, `receive` and `send`, as Starlette's own small modules do it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Scope = dict[str, Any]  # ASGI's scope, receive and send, without importing a framework's types
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BadRequest(Exception):
    """Bad input: the message is the 400 body."""


@dataclass
class Request:
    method: str
    query: dict[str, str]  # the first value of each parameter, as Go's FormValue
    raw_query: str  # the symbol endpoint reads addresses from it, which are not key=value pairs
    body: bytes  # read for POST only


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


def error(status: int, message: str) -> Answer:
    # Go's serveError: plain text, with X-Go-Pprof so `go tool pprof` prints the message.
    return Answer(status, message.encode(), "text/plain; charset=utf-8", [("x-go-pprof", "1")])


def profile(name: str, body: bytes) -> Answer:
    return Answer(
        200,
        body,
        "application/octet-stream",
        [
            ("content-disposition", f'attachment; filename="{name}"'),
            ("x-content-type-options", "nosniff"),
        ],
    )


def text(body: str | bytes) -> Answer:
    data = body.encode() if isinstance(body, str) else body
    return Answer(200, data, "text/plain; charset=utf-8", [("x-content-type-options", "nosniff")])


# Go's strconv.ParseInt takes at most 19 digits into an int64: more is out of range. Checking the
# length first also keeps Python's int() away from its own limit (4,300 digits: a ValueError).
BODY_CHUNK_BYTES = 64 * 1024  # asyncio's default write buffer high-water mark
_GO_INTEGER = re.compile(r"[+-]?[0-9]{1,19}")


def go_int64(value: str) -> int | None:
    """Go's strconv.ParseInt(value, 10, 64): ASCII digits, an optional sign, in int64; else None."""
    if not _GO_INTEGER.fullmatch(value):
        return None
    number = int(value)
    return number if -(2**63) <= number < 2**63 else None


def int_or_zero(value: str) -> int:
    """Go's strconv.Atoi as net/http/pprof uses it for debug and gc: anything else is 0."""
    return go_int64(value) or 0


def first_values(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Go's r.FormValue: the first value of a repeated parameter."""
    query: dict[str, str] = {}
    for key, value in pairs:
        query.setdefault(key, value)
    return query


def route_path(scope: Scope) -> str:
    """The path below the mount point, whether the framework strips the prefix or not."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :]
    return path


async def send_answer(answer: Answer, scope: Scope, send: Send) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    body = b"" if scope["method"] == "HEAD" else answer.body
    # In pieces: the server writes each while this frame is on the stack (the sampler leaves the
    # profiler's own stacks out) and waits for the socket between them, so a profile of megabytes
    # never sits whole in the transport's buffer, sampled there at a new size every time.
    starts = range(0, len(body), BODY_CHUNK_BYTES) or range(1)
    for start in starts:
        piece = body[start : start + BODY_CHUNK_BYTES]
        await send({"type": "http.response.body", "body": piece, "more_body": start < starts[-1]})


class BodyTooLarge(Exception):
    """The request body is longer than its limit (a 413)."""


class BodyTooSlow(Exception):
    """The request body did not arrive in time (a 408)."""


async def read_body(scope: Scope, receive: Receive, limit: int, timeout: float) -> bytes:
    """The request body, refused at once if its Content-Length says it is longer than `limit`,
    and given up on when it has not all arrived within `timeout` seconds."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length" and value.strip().isdigit():
            if int(value) > limit:
                raise BodyTooLarge
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return bytes(body)  # nobody will read the answer; it does not matter
                body += message.get("body", b"")
                if len(body) > limit:
                    raise BodyTooLarge
                if not message.get("more_body", False):
                    return bytes(body)
    except TimeoutError:
        raise BodyTooSlow from None


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone. Once the request body is all in, `receive` waits for
    the disconnect; a server that answers at once again does not follow ASGI, and is not
    watched (rather than spun on)."""
    body_done = False
    while (message := await receive())["type"] != "http.disconnect":
        if body_done:
            await asyncio.Event().wait()
        body_done = not message.get("more_body", False)


async def unless_disconnected(work: Awaitable[Answer], receive: Receive) -> Answer | None:
    """`work`'s answer, or None if the client goes first: then `work` is cancelled at once, so
    that a profile nobody waits for stops (its clean-up runs in its `finally` blocks).

    `work` runs in this task; one more task watches `receive` for the disconnect.
    """
    request_task = asyncio.current_task()
    assert request_task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(receive)
        gone = True
        request_task.cancel()

    watcher = asyncio.create_task(watch(), name="asgi_pprof: waiting for the client to leave")
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled from outside (the server shutting down): let it through
        request_task.uncancel()
        return None
    finally:
        watcher.cancel()
