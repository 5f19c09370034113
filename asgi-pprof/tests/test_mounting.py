"""The same endpoints wherever they are wired in: mounted in FastAPI, in Starlette under another
prefix, as a bare ASGI app, and as middleware around an app that has no `mount`."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from asgi_pprof import PprofApp, PprofMiddleware

from go_pprof import run_pprof
from pprof_decode import decode, invariant_violations, samples
from server import serving

FAST = {"default_window_seconds": 1, "max_window_seconds": 2}


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("OK\n")


def fastapi_app() -> tuple[Any, str]:
    app = FastAPI()
    app.get("/")(lambda: PlainTextResponse("OK\n"))
    app.mount("/debug/pprof", PprofApp(**FAST))
    return app, "/debug/pprof"


def starlette_app() -> tuple[Any, str]:
    routes = [Route("/", ok), Mount("/internal/pprof", app=PprofApp(**FAST))]
    return Starlette(routes=routes), "/internal/pprof"


def bare_app() -> tuple[Any, str]:
    return PprofApp(**FAST), ""


async def plain_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An application with no framework and no `mount`: it answers OK to everything."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"OK\n"})


def middleware_app() -> tuple[Any, str]:
    return PprofMiddleware(plain_asgi, pprof=PprofApp(**FAST)), "/debug/pprof"


def middleware_app_elsewhere() -> tuple[Any, str]:
    wrapped = PprofMiddleware(plain_asgi, prefix="/ops/pprof", pprof=PprofApp(**FAST))
    return wrapped, "/ops/pprof"


WIRINGS = [fastapi_app, starlette_app, bare_app, middleware_app, middleware_app_elsewhere]


def get_all(app: Any, targets: list[str]) -> list[httpx.Response]:
    async def fetch() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            return [await client.get(target) for target in targets]

    return asyncio.run(fetch())


@pytest.fixture
def tracing() -> Iterator[None]:
    tracemalloc.start(4)
    yield
    tracemalloc.stop()


@pytest.mark.usefixtures("tracing")
@pytest.mark.parametrize("wiring", WIRINGS, ids=lambda wiring: wiring.__name__)
def test_every_endpoint_answers_under_its_prefix(wiring: Callable[[], tuple[Any, str]]) -> None:
    app, prefix = wiring()
    names = ["heap", "goroutine", "profile?seconds=1", "heap?debug=1", "goroutine?debug=2"]
    answers = get_all(app, [f"{prefix}/", *(f"{prefix}/{name}" for name in names)])
    index, heap, goroutine, cpu, heap_text, dump = answers
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert "href='heap?debug=1'" in index.text  # relative links: they work under any prefix
    for profile in (heap, goroutine, cpu):
        assert invariant_violations(decode(profile.content)) == []
    assert heap_text.text.startswith("heap profile: ")
    assert dump.text.startswith("thread ")
    cmdline, symbol = get_all(app, [f"{prefix}/cmdline", f"{prefix}/symbol"])
    assert cmdline.content.split(b"\0")[0] and symbol.text == "num_symbols: 1\n"
    assert get_all(app, [f"{prefix}/nothing"])[0].status_code == 404


@pytest.mark.parametrize("wiring", [middleware_app, middleware_app_elsewhere])
def test_the_middleware_passes_everything_else_on(wiring: Callable[[], tuple[Any, str]]) -> None:
    app, prefix = wiring()
    others = ["/", "/debug", "/debug/pprofile", f"{prefix}x/heap", "/elsewhere/pprof/heap"]
    assert [a.text for a in get_all(app, others)] == ["OK\n"] * len(others)


@pytest.mark.parametrize("wiring", [middleware_app, middleware_app_elsewhere])
def test_the_mount_point_without_its_slash_redirects_to_the_index(
    wiring: Callable[[], tuple[Any, str]],
) -> None:
    app, prefix = wiring()
    answer = get_all(app, [prefix])[0]
    assert answer.status_code == 301 and answer.headers["location"] == prefix + "/"


def test_the_middleware_refuses_a_prefix_it_could_not_match() -> None:
    for prefix in ("debug/pprof", "/debug/pprof/", ""):
        with pytest.raises(ValueError, match="prefix"):
            PprofMiddleware(plain_asgi, prefix=prefix)


def test_go_tool_pprof_reads_profiles_through_the_middleware_over_http(
    tmp_path: Any, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    with serving("test_mounting:served_middleware", tmp_path) as server:
        report = run_pprof(go, "-top", server.url + "/debug/pprof/goroutine")
    assert "Type: goroutine" in report


served_middleware = PprofMiddleware(plain_asgi)


retained: list[bytearray] = []


async def retaining_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    retained.append(bytearray(10_000))
    await plain_asgi(scope, receive, send)


@pytest.mark.usefixtures("tracing")
def test_an_app_wrapped_by_the_middleware_shows_its_memory_in_the_heap_profile() -> None:
    """The middleware is on every request's stack: its frames must not hide the app's blocks."""
    app = PprofMiddleware(retaining_asgi)
    answers = get_all(app, ["/"] * 20 + ["/debug/pprof/heap"])
    profile = decode(answers[-1].content)
    kept = sum(
        s.values["inuse_space"]
        for s in samples(profile)
        if s.frames[0].function.endswith("retaining_asgi")
    )
    assert kept >= 20 * 10_000
    retained.clear()
