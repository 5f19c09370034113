"""A bare ASGI application, no framework, with the profiler wired in as the library's README says:
heap tracing from startup, and the middleware answering /debug/pprof/*."""

from __future__ import annotations

from typing import Any

from asgi_pprof import PprofMiddleware, start_tracing

start_tracing(16)  # from startup: the first heap profile shows everything since
retained: list[bytes] = []  # what the service keeps: the heap profile must show it


async def service(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    retained.append(bytes(1000))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"OK\n"})


app = PprofMiddleware(service)
