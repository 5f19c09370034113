"""A small Starlette service with the profiler mounted, as a user's service would have it."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from asgi_pprof import PprofApp, start_sampling

if os.environ.get("EXAMPLE_HEAP_PROFILER") == "sampling":
    start_sampling()  # as a service that wants Go's heap profiler from startup does


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("OK\n")


app = Starlette(routes=[Route("/", ok), Mount("/debug/pprof", app=PprofApp())])
