"""How `leaker serve` runs uvicorn.

- On SIGTERM or Ctrl-C, requests still running after GRACEFUL_SHUTDOWN_SECONDS are cancelled, a
  heap window or a CPU profile among them (they last up to 300 s), then the spans are flushed for
  at most app.tracing.SPAN_FLUSH_TIMEOUT_SECONDS: the service ends within 5 s, inside the 10 s
  Docker waits before it kills.
"""

from __future__ import annotations

import asyncio

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

GRACEFUL_SHUTDOWN_SECONDS = 1
SHUTTING_DOWN_BODY = b"the service is shutting down\n"


class AnswerWhenCancelled:
    """ASGI middleware: a request cancelled by the server is answered 503 and ends quietly.

    uvicorn cancels what still runs after its graceful-shutdown timeout, then answers 500 and logs
    a traceback for each. A request that has started its answer is left unfinished (uvicorn
    closes the connection and says so in one line).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answering = False

        async def send_watched(message: Message) -> None:
            nonlocal answering
            answering = answering or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_watched)
        except asyncio.CancelledError:
            if answering:
                return
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": SHUTTING_DOWN_BODY})


def run(host: str, port: int, access_log: bool) -> None:
    """Serve `app.main:app` until SIGTERM or Ctrl-C.

    uvicorn stops gracefully on either; it then re-raises a SIGTERM, so the process ends as
    killed by it, while a SIGINT (Ctrl-C) ends in a normal return.
    """
    uvicorn.run(
        "app.main:app",
        host=host,
        port=port,
        access_log=access_log,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
