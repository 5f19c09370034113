"""The leaker service: Form3's Go memory-leak demo, in Python.

`GET /` answers `OK` (`GET /orders/{id}`, its order). Every request passes through OpenTelemetry's
ASGI wrapper, which records a SERVER span (exported to Zipkin) and creates its HTTP metric
instruments. No meter provider is configured, so they land on OpenTelemetry's global *proxy*
meter provider, which keeps every meter and instrument it is ever asked for.

- LEAK_MODE=leaky (the Go repo's `master`): the wrapper is built anew on every request, so every
  request adds a meter, three histograms and one up-down counter to the proxy provider (see
  branches.md). Memory grows forever. And a second leak, for labels to find (remember_visit).
- LEAK_MODE=fixed (the Go repo's `fixed-leak`): the wrapper is built once, at startup.

`/metrics` is for Prometheus; `/debug/pprof/` serves heap profiles that lead back to this file.
PPROF_HEAP_PROFILER=sampling starts Go's kind of heap profiler with the app, nearly free.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

import asgi_pprof
from app.heap_metrics import register_heap_metrics
from app.server import AnswerWhenCancelled
from app.settings import Settings, SettingsError
from app.tracing import configure_tracing, shutdown_tracing


class OpenTelemetryPerRequest:
    """LEAK_MODE=leaky: builds the OpenTelemetry wrapper inside a per-request middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await OpenTelemetryMiddleware(self.app)(scope, receive, send)  # the leak


def create_app(settings: Settings) -> FastAPI:
    if _sampled(settings):
        _start_sampling(settings)  # first: what the app allocates from here on is sampled
    tracer_provider = configure_tracing(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        exact = settings.heap_profiler == "tracemalloc"
        if settings.pprof_enabled and exact and settings.tracemalloc_start == "startup":
            # After the imports, so that startup stays fast.
            asgi_pprof.start_tracing(settings.tracemalloc_frames)
        yield
        # Send the queued spans, for a bounded time: uvicorn re-raises SIGTERM after shutdown, so
        # atexit never runs. The requests cut off by `leaker serve`'s graceful-shutdown timeout
        # were cancelled just before this: unless their clean-up waits, their spans have ended.
        shutdown_tracing(tracer_provider)

    # The second leak: every route shares this dependency, so its allocations have one stack
    # whichever route asked; only the `http.route` label on their samples names the route.
    # Keyed by path (leaky), it keeps an entry per order ever asked for; by route (fixed), one.
    last_visits: dict[str, dict[str, str]] = {}

    def remember_visit(request: Request) -> None:
        if settings.leak_mode == "leaky":
            last_visits[request.url.path] = dict(request.headers)  # the second leak
        else:
            last_visits[request.scope["route"].path] = dict(request.headers)  # fixed: per route

    # FastAPI's native telemetry would add a second SERVER span per request.
    no_telemetry = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    app = FastAPI(
        telemetry=no_telemetry,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(remember_visit)],
    )

    @app.get("/", response_class=PlainTextResponse)
    async def ok() -> str:
        return "OK\n"

    @app.get("/orders/{order_id}", response_class=PlainTextResponse)
    async def order(order_id: int) -> str:
        return f"order {order_id}\n"

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    if settings.pprof_enabled:
        app.mount("/debug/pprof", asgi_pprof.PprofApp(frames=settings.tracemalloc_frames))

    if settings.leak_mode == "leaky":
        app.add_middleware(OpenTelemetryPerRequest)
    else:
        app.add_middleware(OpenTelemetryMiddleware)  # the fix: one wrapper, built once at startup
    app.add_middleware(AnswerWhenCancelled)  # at shutdown: a 503 for a profile cut short
    if _sampled(settings) and settings.pprof_labels:
        app.add_middleware(asgi_pprof.LabelMiddleware)  # outermost: every allocation labelled
    return app


def _sampled(settings: Settings) -> bool:
    return settings.pprof_enabled and settings.heap_profiler == "sampling"


def _start_sampling(settings: Settings) -> None:
    if asgi_pprof.sampling.is_running():
        return  # one sampler per process, as one Go runtime
    try:
        asgi_pprof.start_sampling(
            rate=settings.mem_profile_rate,
            max_bytes=settings.mem_profile_max_bytes,
            threads=settings.pprof_labels,
        )
    except asgi_pprof.SamplingUnavailable as error:
        # Asked for by name: serving without it would be serving a different profiler unsaid.
        raise SettingsError(
            f"PPROF_HEAP_PROFILER=sampling: {error}; PPROF_HEAP_PROFILER=tracemalloc runs anywhere"
        ) from error
    register_heap_metrics()


def _app_from_environ() -> FastAPI:
    try:
        return create_app(Settings.from_environ())
    except (SettingsError, asgi_pprof.multiproc.MultiprocConfigError) as error:
        sys.exit(f"leaker: invalid setting: {error}")


def __getattr__(name: str) -> FastAPI:
    """`app` is built from the environment when first asked for (`uvicorn app.main:app`), so that
    importing `create_app` configures nothing."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    global app
    app = _app_from_environ()
    return app
