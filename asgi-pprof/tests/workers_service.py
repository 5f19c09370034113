"""A service that the tests run as several workers: the sampler started in each, as a service
that wants Go's heap profiler does, and a leak in whichever worker answers /leak.

The sampler starts before the framework is imported, at one allocation in 16 KiB: what each
worker keeps of its imports is then hundreds of samples, so that every worker's pid is in every
heap profile (an idle worker sampled at 512 KiB may have no sample at all, hence no label).
"""

from __future__ import annotations

import asgi_pprof

asgi_pprof.start_sampling(rate=16384)

import os  # noqa: E402

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Mount, Route  # noqa: E402

LEAK_BLOCK_BYTES = 1 << 20
_kept: list[bytearray] = []


async def whoami(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{os.getpid()}\n")


async def leak_here(request: Request) -> PlainTextResponse:
    """Keeps `mib` MiB (default 1) in this worker for good, and says which worker this is and how
    much it keeps."""
    for _ in range(int(request.query_params.get("mib", "1"))):
        _kept.append(bytearray(LEAK_BLOCK_BYTES))
    return PlainTextResponse(f"{os.getpid()} {len(_kept) * LEAK_BLOCK_BYTES}\n")


app = Starlette(
    routes=[
        Route("/", whoami),
        Route("/leak", leak_here),
        Mount("/debug/pprof", app=asgi_pprof.PprofApp()),
    ]
)
