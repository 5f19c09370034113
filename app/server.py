"""How `leaker serve` runs uvicorn: bounded waits at both ends of a connection's life.

- A request head (request line and headers) must arrive within `header_timeout` seconds, as Go's
  `http.Server.ReadHeaderTimeout` asks: uvicorn waits forever for a head trickled a byte at a
  time (slowloris), or for a connection that never sends one. Timed from the connection's start,
  or on a kept-alive connection from the first byte of the next request (until then uvicorn's
  own keep-alive timeout of 5 s applies). A partial head is answered 408; a silent connection is
  just closed. The request body is not timed here: bounding what it reads is the profiler's.
- On SIGTERM or Ctrl-C, requests still running after GRACEFUL_SHUTDOWN_SECONDS are cancelled, a
  heap window or a CPU profile among them (they last up to 300 s), then the spans are flushed for
  at most app.tracing.SPAN_FLUSH_TIMEOUT_SECONDS: the service ends within 5 s, inside the 10 s
  Docker waits before it kills.

uvicorn picks httptools over h11 when httptools is installed; `leaker serve` names its protocol,
h11, so that the head timeout below always applies.
"""

from __future__ import annotations

import asyncio
import gc

import h11
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

GRACEFUL_SHUTDOWN_SECONDS = 1
HEADER_TIMEOUT_SECONDS = 10.0
TIMED_OUT_BODY = b"request head not received in time\n"
TIMED_OUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(TIMED_OUT_BODY), TIMED_OUT_BODY)
)
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


class H11WithHeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is late."""

    header_timeout: float = HEADER_TIMEOUT_SECONDS
    header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still no complete head: this one is timed
            self._start_header_timer()
        else:
            self._stop_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        if self.header_timer is None:  # started once per head, not again at each byte
            self.header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timed_out(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        received, _ = self.conn.trailing_data
        if received:
            self.transport.write(TIMED_OUT_RESPONSE)
        self.transport.close()


def with_header_timeout(seconds: float) -> type[H11WithHeaderTimeout]:
    """The protocol class, for uvicorn's `http=`, with its head timeout set to `seconds`."""
    return type("H11WithHeaderTimeout", (H11WithHeaderTimeout,), {"header_timeout": seconds})


def run(host: str, port: int, access_log: bool, header_timeout: float) -> None:
    """Serve `app.main:app` until SIGTERM or Ctrl-C.

    uvicorn stops gracefully on either; it then re-raises a SIGTERM, so the process ends as
    killed by it, while a SIGINT (Ctrl-C) ends in a normal return.
    """
    uvicorn.run(
        "app.main:app",
        host=host,
        port=port,
        access_log=access_log,
        http=with_header_timeout(header_timeout),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    # After Ctrl-C the process exits normally, and the interpreter's last garbage collection
    # would walk the whole heap: seconds when the leak has grown it. Nothing needs it now.
    gc.freeze()
