"""/debug/pprof/symbol and /debug/pprof/cmdline: net/http/pprof's endpoints besides the profiles.

`symbol` answers Go's symbol lookup protocol. The decisive test has the real `go tool pprof` read
a debug=1 goroutine profile over HTTP: that text names its functions only in `#` comment lines,
which pprof skips, so the Python names it prints can only come from its questions to `symbol`.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_pprof import PprofApp
from asgi_pprof.handlers import MAX_SYMBOL_REQUEST_BYTES

from go_pprof import run_pprof
from server import Server, serving

SYMBOL_LINE = re.compile(r"(0x[0-9a-f]+) (.+)")  # names of frozen modules have a space
FRAME_LINE = re.compile(r"^#\t(0x[0-9a-f]+)\t(.+?) *\t", re.MULTILINE)  # `#\taddress\tname\tfile`


async def ask(app: PprofApp, method: str, target: str, body: bytes = b"") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pprof") as client:
        return await client.request(method, target, content=body)


def request(method: str, target: str, body: bytes = b"") -> httpx.Response:
    return asyncio.run(ask(PprofApp(), method, target, body))


def frames_of_a_goroutine_profile() -> dict[int, str]:
    """Address -> function, from the `#` lines of a debug=1 goroutine profile of this process."""
    text = request("GET", "/goroutine?debug=1").text
    return {int(address, 16): name for address, name in FRAME_LINE.findall(text)}


def test_get_says_there_are_symbols() -> None:
    answer = request("GET", "/symbol")
    assert answer.status_code == 200
    assert answer.text == "num_symbols: 1\n"
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_post_names_the_addresses_of_the_legacy_texts() -> None:
    frames = frames_of_a_goroutine_profile()
    assert frames
    body = "+".join(f"{address:#x}" for address in frames).encode()
    first, *lines = request("POST", "/symbol", body).text.splitlines()
    assert first == "num_symbols: 1"
    named = (SYMBOL_LINE.fullmatch(line).groups() for line in lines)
    assert {int(address, 16): name for address, name in named} == frames


def test_the_byte_before_a_return_address_is_its_call() -> None:
    """pprof asks for `return address - 1`; the `@` lines list return addresses, one past."""
    address, name = next(iter(frames_of_a_goroutine_profile().items()))
    answer = request("POST", "/symbol", f"{address:#x}+{address + 1:#x}".encode())
    assert answer.text.splitlines()[1:] == [f"{address:#x} {name}", f"{address + 1:#x} {name}"]


def test_what_is_not_a_known_address_is_skipped_as_go_does() -> None:
    address, name = next(iter(frames_of_a_goroutine_profile().items()))
    body = f"zebra+0x+-1+0x0+{2**64:#x}+0x10+{address:#x}+\xff".encode("latin-1")
    answer = request("POST", "/symbol", body)
    assert answer.status_code == 200
    assert answer.text == f"num_symbols: 1\n{address:#x} {name}\n"


def test_get_reads_the_addresses_from_the_query_as_go_does() -> None:
    address, name = next(iter(frames_of_a_goroutine_profile().items()))
    answer = request("GET", f"/symbol?{address:#x}+nonsense")
    assert answer.text == f"num_symbols: 1\n{address:#x} {name}\n"


def test_methods() -> None:
    for method, target, allowed in (
        ("PUT", "/symbol", "GET, HEAD, POST"),
        ("POST", "/goroutine", "GET, HEAD"),
        ("DELETE", "/cmdline", "GET, HEAD"),
    ):
        answer = request(method, target)
        assert (answer.status_code, answer.headers["allow"]) == (405, allowed)


def test_a_body_too_large_is_refused() -> None:
    answer = request("POST", "/symbol", b"0x400000+" * (MAX_SYMBOL_REQUEST_BYTES // 9 + 1))
    assert answer.status_code == 413


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(alphabet="0x123456789abcdefX+ \n-_", max_size=80))
def test_no_body_gets_a_server_error(body: bytes | str) -> None:
    raw = body if isinstance(body, bytes) else body.encode()
    answer = request("POST", "/symbol", raw)
    assert answer.status_code == 200
    first, *lines = answer.text.splitlines()
    assert first == "num_symbols: 1"
    for line in lines:
        address, _ = SYMBOL_LINE.fullmatch(line).groups()
        assert int(address, 16) in {_go_parse(word) for word in raw.split(b"+")}


def _go_parse(word: bytes) -> int | None:
    try:
        return int(word.decode("ascii"), 0)
    except (UnicodeDecodeError, ValueError):
        return None


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_no_query_gets_a_server_error(query: str) -> None:
    for endpoint in ("/symbol", "/cmdline"):
        answer = request("GET", f"{endpoint}?{urllib.parse.quote(query, safe='&=+%')}")
        assert answer.status_code == 200


def test_cmdline_is_the_command_line_separated_by_nul_bytes() -> None:
    answer = request("GET", "/cmdline?debug=1")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.content.split(b"\0") == [os.fsencode(argument) for argument in sys.orig_argv]


# ---- The real service, read by the real `go tool pprof` ----------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving("example_service:app", tmp_path_factory.mktemp("symbol-service")) as running:
        yield running


def test_the_services_cmdline_is_what_linux_says_it_was_started_with(service: Server) -> None:
    with urllib.request.urlopen(service.url + "/debug/pprof/cmdline") as answer:
        body = answer.read()
    with open(f"/proc/{service.process.pid}/cmdline", "rb") as cmdline:
        assert body + b"\0" == cmdline.read()


def pprof_top(go: str, *arguments: str) -> str:
    return run_pprof(go, "-top", "-nodecount=1000", *arguments)


def test_go_tool_pprof_names_a_legacy_profile_through_the_symbol_endpoint(
    service: Server, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    url = service.url + "/debug/pprof/goroutine?debug=1"
    named = pprof_top(go, url)
    # uvicorn's main loop waits in asyncio.sleep; the service's threads run uvicorn's main().
    for function in ("uvicorn.server.Server.main_loop", "asyncio.tasks.sleep", "uvicorn.main.main"):
        assert re.search(rf"\s{re.escape(function)}$", named, re.MULTILINE), named
    # Without asking the endpoint, pprof has nothing but addresses: every function is unknown.
    unnamed = pprof_top(go, "-symbolize=none", url)
    assert re.findall(r"^\s*\d+\s+\S+%.*%\s+(\S.*)$", unnamed, re.MULTILINE) == ["<unknown>"]


def test_pprof_asks_the_endpoint_with_a_post(service: Server) -> None:
    """What pprof's symbolz client sends: a POST of `+`-joined addresses, answered by name."""
    with urllib.request.urlopen(service.url + "/debug/pprof/goroutine?debug=1") as answer:
        text = answer.read().decode()
    frames = dict(FRAME_LINE.findall(text))
    body = "+".join(frames).encode()
    post = urllib.request.Request(service.url + "/debug/pprof/symbol", data=body, method="POST")
    with urllib.request.urlopen(post) as answer:
        first, *lines = answer.read().decode().splitlines()
    assert first == "num_symbols: 1"
    assert dict(SYMBOL_LINE.fullmatch(line).groups() for line in lines) == frames


def test_the_service_answers_odd_symbol_requests_without_error(service: Server) -> None:
    statuses = []
    for body in (b"", b"+", b"0x", b"\xff\xfe", b"0x400000+" * 1000, b"1" * 5000):
        post = urllib.request.Request(service.url + "/debug/pprof/symbol", data=body)
        try:
            with urllib.request.urlopen(post) as answer:
                statuses.append(answer.status)
        except urllib.error.HTTPError as error:
            statuses.append(error.code)
    assert statuses == [200] * 6
