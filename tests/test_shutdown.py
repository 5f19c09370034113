"""`leaker serve` stops within 5 s of a SIGTERM, whatever is open, and flushes its spans first.

Docker sends SIGTERM and kills 10 s later. Two things used to outlast that: requests that run
for their `seconds` (a heap window, a CPU profile: up to 300 s), which uvicorn waited for, and the
span flush, which exported batch after batch to a Zipkin that accepts but never answers (2 s each).
Now requests still open after 1 s are cancelled and answered 503, and the flush stops after 2 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.load import run_load
from tests.service import free_port
from tests.zipkin_receiver import zipkin_receiver

ROOT = Path(__file__).resolve().parent.parent
SHUTDOWN_LIMIT_SECONDS = 5.0
# Enough spans for four of BatchSpanProcessor's 512-span batches: at 2 s a batch against a
# hanging Zipkin, a flush that is not bounded takes 8 s.
REQUESTS = 1800
LONG_REQUESTS = ("/debug/pprof/profile?seconds=30", "/debug/pprof/heap?seconds=30")

Span = dict[str, Any]


@dataclass
class Serve:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    answers: dict[str, str] = field(default_factory=dict)  # long request: how it ended

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def leaker_serve(env: dict[str, str], tmp_path: Path) -> Iterator[Serve]:
    """`leaker serve` on a free port, as Docker runs it; killed at the end if still running."""
    port = free_port()
    log_path = tmp_path / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    serve = Serve(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, serve.log()
            try:
                with urllib.request.urlopen(serve.url + "/", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, serve.log()
                time.sleep(0.05)
        yield serve
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def open_long_requests(serve: Serve) -> list[threading.Thread]:
    """Start the long requests, each in a thread that records how it ended."""

    def fetch(path: str) -> None:
        try:
            with urllib.request.urlopen(serve.url + path, timeout=60) as answer:
                answer.read()
                serve.answers[path] = f"{answer.status}"
        except urllib.error.HTTPError as error:
            serve.answers[path] = f"{error.code}"
        except OSError as error:  # cut off by the shutdown
            serve.answers[path] = f"{type(error).__name__}"

    threads = [threading.Thread(target=fetch, args=(path,), daemon=True) for path in LONG_REQUESTS]
    for thread in threads:
        thread.start()
    wait_until_open(serve)
    return threads


def wait_until_open(serve: Serve) -> None:
    """Until the heap window traces and the CPU profile holds the profiler (others get 409)."""
    time.sleep(0.5)  # so that the probe below does not take the CPU profiler first
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(serve.url + "/debug/pprof/", timeout=10) as answer:
            tracing = b"Tracing now" in answer.read()
        try:
            with urllib.request.urlopen(serve.url + "/debug/pprof/profile?seconds=1", timeout=10):
                profiling = False
        except urllib.error.HTTPError as error:
            profiling = error.code == 409
        if tracing and profiling:
            return
        time.sleep(0.1)
    raise AssertionError(f"the long requests did not start: {serve.answers}\n{serve.log()}")


def stop_and_time(serve: Serve) -> float:
    """SIGTERM, then the seconds until the process has exited (at most 60: then it is killed)."""
    started = time.monotonic()
    serve.process.send_signal(signal.SIGTERM)
    try:
        serve.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 60 s after SIGTERM:\n{serve.log()}")
    return time.monotonic() - started


def zipkin_env(endpoint: str) -> dict[str, str]:
    return {
        "LEAK_MODE": "fixed",
        "OTEL_TRACES_EXPORTER": "zipkin",
        "OTEL_EXPORTER_ZIPKIN_ENDPOINT": endpoint,
        # No periodic export: the spans stay queued until a batch is full or the service stops.
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
    }


def load(serve: Serve, requests: int) -> None:
    result = asyncio.run(run_load(serve.url + "/", concurrency=10, requests=requests))
    assert result.requests == requests and result.errors == 0


def test_sigterm_with_profiles_open_and_a_hanging_zipkin_ends_within_5_s(tmp_path: Path) -> None:
    with zipkin_receiver(behaviour="hang") as receiver:
        with leaker_serve(zipkin_env(receiver.endpoint), tmp_path) as serve:
            load(serve, REQUESTS)
            threads = open_long_requests(serve)
            took = stop_and_time(serve)
            for thread in threads:
                thread.join(timeout=10)
        posted = receiver.posted()

    print(f"SIGTERM to exit: {took:.2f} s; {posted} batches posted; long requests: {serve.answers}")
    assert took < SHUTDOWN_LIMIT_SECONDS, serve.log()
    assert posted >= 1  # the flush did try
    # Cut short, with an answer that says why: neither waited out its 30 s.
    assert serve.answers == {path: "503" for path in LONG_REQUESTS}
    assert serve.process.returncode == -signal.SIGTERM  # as uvicorn ends: killed by the signal
    assert "Traceback" not in serve.log()


def server_spans_for(spans: list[Span], target: str) -> list[Span]:
    return [
        span
        for span in spans
        if span.get("kind") == "SERVER" and span.get("tags", {}).get("http.target") == target
    ]


def test_sigterm_with_profiles_open_flushes_every_span_within_5_s(tmp_path: Path) -> None:
    with zipkin_receiver() as receiver:
        with leaker_serve(zipkin_env(receiver.endpoint), tmp_path) as serve:
            load(serve, REQUESTS)
            threads = open_long_requests(serve)
            took = stop_and_time(serve)
            for thread in threads:
                thread.join(timeout=10)
        spans = receiver.received()

    root_spans = server_spans_for(spans, "/")
    print(f"SIGTERM to exit: {took:.2f} s; {len(spans)} spans, {len(root_spans)} for GET /")
    assert took < SHUTDOWN_LIMIT_SECONDS, serve.log()
    # Every request answered before the SIGTERM has its span in Zipkin: the load's, plus the one
    # leaker_serve made to see the service up, the one run_load makes to check its target.
    assert len(root_spans) == REQUESTS + 2
    # The two requests cut short ended their spans (with no status: they had not answered) before
    # the flush, which sent them too.
    for path in LONG_REQUESTS:
        cut_short = [
            span
            for span in server_spans_for(spans, path.partition("?")[0])
            if "http.status_code" not in span["tags"]
        ]
        assert len(cut_short) == 1, path
    assert serve.answers == {path: "503" for path in LONG_REQUESTS}
    assert receiver.rejected() == []
    assert "Traceback" not in serve.log()


LEAKY_REQUESTS = 8000
EXIT_AFTER_SHUTDOWN_LIMIT_SECONDS = 0.5  # from uvicorn's last line to the process's end


def test_ctrl_c_ends_a_leaky_service_without_collecting_its_garbage(tmp_path: Path) -> None:
    env = {"LEAK_MODE": "leaky", "OTEL_TRACES_EXPORTER": "none"}
    with leaker_serve(env, tmp_path) as serve:
        load(serve, LEAKY_REQUESTS)  # the leak: some 150,000 objects kept
        started = time.monotonic()
        serve.process.send_signal(signal.SIGINT)
        while "Finished server process" not in serve.log():
            assert time.monotonic() - started < 30, serve.log()
            time.sleep(0.01)
        finished = time.monotonic()
        serve.process.wait(timeout=60)
        ended = time.monotonic()

    print(
        f"Ctrl-C to uvicorn's last line {finished - started:.2f} s, to exit {ended - started:.2f} s"
    )
    assert serve.process.returncode == 0
    assert ended - started < SHUTDOWN_LIMIT_SECONDS
    # The interpreter's last collection walked the whole heap: about 1 s here.
    assert ended - finished < EXIT_AFTER_SHUTDOWN_LIMIT_SECONDS, serve.log()
