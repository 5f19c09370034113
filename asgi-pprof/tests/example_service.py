"""A small Starlette service with the profiler mounted, as a user's service would have it."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from asgi_pprof import PprofApp


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("OK\n")


app = Starlette(routes=[Route("/", ok), Mount("/debug/pprof", app=PprofApp())])
