"""Serve a test application with uvicorn in a subprocess, on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
STARTUP_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def serving(
    app: str,
    tmp_path: Path,
    app_dir: Path = TESTS,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/debug/pprof/",
    server_args: Sequence[str] = (),
    gunicorn: bool = False,
) -> Iterator[Server]:
    """`uvicorn APP` (module:attribute, imported from `app_dir`), or `gunicorn APP` with
    `gunicorn`; `server_args` added to its command line; stopped with SIGTERM after."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    if gunicorn:
        command = [
            python, "-m", "gunicorn", app, "--pythonpath", str(app_dir),
            "--bind", f"127.0.0.1:{port}", *server_args,
        ]  # fmt: skip
    else:
        command = [
            python, "-m", "uvicorn", app, "--app-dir", str(app_dir),
            "--host", "127.0.0.1", "--port", str(port), "--no-access-log", *server_args,
        ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=tmp_path,  # nothing of this repository's on sys.path but the app's own folder
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"{app} exited with {process.returncode}:\n{server.log()}")
            try:
                with urllib.request.urlopen(server.url + ready_path, timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{app} did not start:\n{server.log()}")
                time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
