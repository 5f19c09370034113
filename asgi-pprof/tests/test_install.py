"""The library on its own: installed from its folder into a fresh virtual environment, with
nothing of the leaker demo, serving a user's application whose own package is named `app`."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from go_pprof import run_pprof
from server import TESTS, Server, serving

LIBRARY = TESTS.parent
# Only what serving the test application takes; the library itself needs nothing.
SERVER_PINS = ["uvicorn==0.54.0", "h11==0.16.0", "click==8.5.1"]


def pip(venv: Path, *arguments: str) -> None:
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *arguments],
        check=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip(venv, str(LIBRARY))  # from its folder: a regular, not an editable, install
    pip(venv, "--no-deps", *SERVER_PINS)
    return venv


def python_in(venv: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=venv,  # not this repository: nothing of it on sys.path
    )


def test_the_library_installs_alone_and_brings_no_app_package(venv: Path) -> None:
    assert python_in(venv, "import asgi_pprof").returncode == 0
    no_app = python_in(venv, "import app")
    assert no_app.returncode != 0 and "No module named 'app'" in no_app.stderr
    requires = python_in(venv, "import importlib.metadata as m; print(m.requires('asgi-pprof'))")
    # No dependency at run time: every requirement is for an extra (the test suite's).
    assert all('extra == "test"' in r for r in ast.literal_eval(requires.stdout)), requires.stdout
    installed = python_in(venv, "import asgi_pprof; print(asgi_pprof.__file__)").stdout
    assert "site-packages" in installed  # not this repository's source folder


@pytest.fixture(scope="module")
def user_app(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    python = str(venv / "bin" / "python")
    tmp_path = tmp_path_factory.mktemp("user-app")
    with serving("app.main:app", tmp_path, app_dir=TESTS / "standalone", python=python) as server:
        for _ in range(50):
            with urllib.request.urlopen(server.url + "/", timeout=10) as answer:
                assert answer.read() == b"OK\n"
        yield server


def test_a_user_app_named_app_serves_every_profile_that_pprof_reads(
    user_app: Server, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    base = user_app.url + "/debug/pprof/"
    heap = run_pprof(go, "-top", "-lines", "-focus=app.main.service", base + "heap")
    # The app keeps 1000 bytes per request, from its own service() in its own app/main.py.
    assert re.search(r"app\.main\.service .*standalone/app/main\.py:\d+", heap), heap
    goroutine = run_pprof(go, "-top", base + "goroutine")
    assert "Type: goroutine" in goroutine
    cpu = run_pprof(go, "-seconds", "1", "-top", base + "profile")
    assert "Type: cpu" in cpu
    # A legacy text read over HTTP: pprof names its addresses through /symbol.
    named = run_pprof(go, "-top", base + "goroutine?debug=1")
    assert "uvicorn.server.Server.main_loop" in named
    with urllib.request.urlopen(base + "cmdline", timeout=10) as answer:
        argv = answer.read().split(b"\0")
    assert b"uvicorn" in argv and b"app.main:app" in argv
    with urllib.request.urlopen(base, timeout=10) as answer:
        index = answer.read().decode()
    for name in ("cmdline", "goroutine", "heap", "profile"):
        assert f"href='{name}?debug=1'" in index
