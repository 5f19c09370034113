"""Placeholder until the real package lands (being written now)."""

from __future__ import annotations

import tracemalloc

from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send


def start_tracing(frames: int) -> None:
    tracemalloc.start(frames)


class PprofApp:
    def __init__(self, frames: int = 32, max_seconds: int = 300) -> None:
        self.frames = frames

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("pprof placeholder")(scope, receive, send)
