"""The processes `make docs` runs: `leaker serve`, Prometheus, pprof's web UI, each on a free
loopback port, ready once it answers, stopped with its children afterwards."""

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAKER = [sys.executable, "-m", "app.cli"]
STARTUP_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(
    command: Sequence[str], ready_url: str, log_path: Path, env: Mapping[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """`command` started, and ready once `ready_url` answers 200; stopped (its process group)
    afterwards. Its output goes to `log_path`, shown if it does not start."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its children (uvicorn's, pprof's dot) stop with it
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not answers(ready_url):
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = log_path.read_text(errors="replace")
                raise RuntimeError(f"`{' '.join(command)}` did not start:\n{log_text}")
            time.sleep(0.1)
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to its process group; SIGKILL after 10 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


@contextmanager
def serving(
    mode: str,
    log_dir: Path,
    profiler: str = "tracemalloc",
    zipkin: str | None = None,
    settings: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """`leaker serve` as the tutorial starts it, on a free port; yields its URL. Traces go to the
    `zipkin` endpoint if given, else nowhere; `settings` adds environment variables."""
    port = free_port()
    env = {
        **os.environ,
        "LEAK_MODE": mode,
        "PPROF_HEAP_PROFILER": profiler,
        "PPROF_TRACEMALLOC": "startup",
        "OTEL_TRACES_EXPORTER": "zipkin" if zipkin else "none",
        **({"OTEL_EXPORTER_ZIPKIN_ENDPOINT": zipkin} if zipkin else {}),
        "PYTHONUNBUFFERED": "1",
        **(settings or {}),
    }
    log_path = log_dir / f"{mode}-{profiler}-serve.log"
    url = f"http://127.0.0.1:{port}"
    with running([*LEAKER, "serve", "--port", str(port)], url + "/", log_path, env):
        try:
            yield url
        except Exception:
            sys.stderr.write(f"make_docs: {log_path}:\n{log_path.read_text(errors='replace')}")
            raise
