"""`leaker serve` and `leaker load` as a user runs them: real processes, real signals.

The `leaker` script exists once the project is installed (`pip install -e .`); these tests run the
same entry point as `python -m app.cli`.
"""

from __future__ import annotations

import argparse
import os
import pty
import signal
import subprocess
import sys
import threading
import time
import tty
import types
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import app
from app.cli import main
from app.settings import ENVIRONMENT_VARIABLES
from tests.service import free_port

ROOT = Path(__file__).resolve().parent.parent
LEAKER = [sys.executable, "-m", "app.cli"]
SERVICE_ENV = {"LEAK_MODE": "fixed", "OTEL_TRACES_EXPORTER": "none", "PYTHONUNBUFFERED": "1"}


def leaker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LEAKER, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


class CountingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the load generator expects
    served = 0
    dead = False  # set: kept-alive connections are closed unanswered, as by a crash

    def do_GET(self) -> None:  # noqa: N802 (the name http.server looks for)
        if type(self).dead:
            self.close_connection = True
            return
        type(self).served += 1
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"OK\n")

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output quiet


@pytest.fixture
def counting_server() -> Iterator[tuple[str, type[CountingHandler]]]:
    handler = type("Handler", (CountingHandler,), {"served": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler
    finally:
        server.shutdown()
        server.server_close()


def test_load_prints_a_summary_and_exits_0(
    counting_server: tuple[str, type[CountingHandler]],
) -> None:
    url, handler = counting_server
    finished = leaker("load", "--url", url, "--concurrency", "4", "--requests", "150")

    assert finished.returncode == 0, finished.stderr
    assert "requests:    150\n" in finished.stdout
    assert "errors:      0 " in finished.stdout
    assert "req/s:" in finished.stdout and "latency p99:" in finished.stdout
    assert handler.served == 150 + 1  # and the reachability check


class HangingHandler(CountingHandler):
    """Answers the first request (the load's check), then reads requests and never answers."""

    def do_GET(self) -> None:  # noqa: N802
        if type(self).served >= 1:
            type(self).served += 1
            time.sleep(60)  # a daemon thread: gone with the server
            return
        super().do_GET()


class FailingHandler(CountingHandler):
    def do_GET(self) -> None:  # noqa: N802
        type(self).served += 1
        self.send_response(500)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"oops\n")


@contextmanager
def http_server(
    handler_class: type[CountingHandler],
) -> Iterator[tuple[str, type[CountingHandler]]]:
    """Serve on a free loopback port until the block ends; then connections are refused."""
    handler = type("Handler", (handler_class,), {"served": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler
    finally:
        server.shutdown()
        server.server_close()


def test_load_with_a_duration_against_a_hanging_target_ends_at_the_deadline() -> None:
    with http_server(HangingHandler) as (url, _):
        started = time.monotonic()
        finished = leaker("load", "--url", url, "--concurrency", "4", "--duration", "2")
        took = time.monotonic() - started

    print(f"took {took:.1f} s:\n{finished.stdout}{finished.stderr}")
    assert took < 5  # 2 s, and Python's start: not the 20 s a request may wait
    assert "requests:    0\n" in finished.stdout  # the summary, with nothing answered
    assert finished.returncode == 1  # nothing succeeded
    assert "no request got a 2xx answer" in finished.stderr


def test_load_of_only_500s_exits_1_after_its_summary() -> None:
    with http_server(FailingHandler) as (url, _):
        finished = leaker("load", "--url", url, "--concurrency", "2", "--requests", "20")

    assert finished.returncode == 1
    assert "statuses:    500: 20" in finished.stdout
    assert "no request got a 2xx answer" in finished.stderr


def test_load_of_a_target_that_dies_stops_within_seconds_and_exits_1() -> None:
    process = None
    with http_server(CountingHandler) as (url, handler):
        process = subprocess.Popen(
            [*LEAKER, "load", "--url", url, "--concurrency", "4", "--requests", "1000000"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while handler.served < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        handler.dead = True
    died = time.monotonic()  # the server is closed too: new connections are refused
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    took = time.monotonic() - died

    print(f"stopped {took:.1f} s after the target died:\n{stdout}{stderr}")
    assert took < 10 + 5  # TARGET_GONE_SECONDS, a backoff and Python's exit
    assert process.returncode == 1
    assert "requests:" in stdout  # the summary still
    assert f"stopped early: {url} has not answered for" in stderr
    assert "Connection refused" in stderr
    assert "Traceback" not in stderr


def test_load_on_sigterm_prints_the_summary_and_exits_143(
    counting_server: tuple[str, type[CountingHandler]],
) -> None:
    url, handler = counting_server
    process = subprocess.Popen(
        [*LEAKER, "load", "--url", url, "--concurrency", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while handler.served < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "requests:" in stdout and "latency p50:" in stdout
    assert "Traceback" not in stderr


class PathHandler(CountingHandler):
    paths: list[str]  # of every request answered; set on the class a test serves with

    def do_GET(self) -> None:  # noqa: N802
        type(self).paths.append(self.path)
        super().do_GET()


def test_load_with_n_in_the_url_asks_for_a_path_per_request() -> None:
    with http_server(PathHandler) as (url, handler):
        handler.paths = []
        finished = leaker("load", "--url", url + "orders/{n}", "--requests", "40")

    assert finished.returncode == 0, finished.stderr
    assert "requests:    40\n" in finished.stdout
    assert sorted(handler.paths) == sorted(f"/orders/{number}" for number in range(41))


def test_load_help_says_it_runs_until_ctrl_c_and_lists_the_exit_statuses() -> None:
    finished = leaker("load", "--help")

    assert finished.returncode == 0
    text = " ".join(finished.stdout.split())
    assert "Without --requests or --duration it runs until Ctrl-C" in text
    assert "exit status:" in text
    for status in ("0 ", "1 ", "2 ", "130 ", "143"):
        assert f" {status}" in text


def test_load_rewrites_one_progress_line_on_a_terminal(
    counting_server: tuple[str, type[CountingHandler]],
) -> None:
    url, _ = counting_server
    terminal, stderr_side = pty.openpty()
    tty.setraw(stderr_side)  # bytes as written: no \n -> \r\n translation
    process = subprocess.Popen(
        [*LEAKER, "load", "--url", url, "--concurrency", "2", "--duration", "1.6"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr_side,
        text=True,
    )
    os.close(stderr_side)
    shown = b""
    try:
        while chunk := read_terminal(terminal):
            shown += chunk
        stdout, _ = process.communicate(timeout=30)
    finally:
        process.kill()
        os.close(terminal)

    assert process.returncode == 0
    assert "requests:" in stdout
    lines = shown.decode().split("\r")
    assert len(lines) >= 3  # rewritten in place, several times
    assert all("req/s now" in line for line in lines[1:])
    assert shown.endswith(b"\n") and shown.count(b"\n") == 1  # then one newline, at the end


def read_terminal(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # Linux: EIO once the other side is closed
        return b""


def test_load_of_a_closed_port_exits_1_with_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    finished = leaker("load", "--url", url, "--concurrency", "10", "--requests", "100")

    assert finished.returncode == 1
    assert finished.stdout == ""
    assert finished.stderr.count("\n") == 1
    assert url in finished.stderr and "Connection refused" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_load_until_ctrl_c_prints_the_summary_and_exits_130(
    counting_server: tuple[str, type[CountingHandler]],
) -> None:
    url, handler = counting_server
    process = subprocess.Popen(
        [*LEAKER, "load", "--url", url, "--concurrency", "2", "--duration", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while handler.served < 50 and time.monotonic() < deadline:  # the load is under way
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == 130, stderr
    assert "requests:" in stdout and "latency p50:" in stdout
    assert "Traceback" not in stderr


def start_serve(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    process = subprocess.Popen(
        [*LEAKER, "serve", "--port", str(port), *args],
        cwd=ROOT,
        env={**os.environ, **SERVICE_ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, f"http://127.0.0.1:{port}/"


def get_when_up(process: subprocess.Popen[str], url: str) -> tuple[bytes, str]:
    """Body and Content-Type of GET `url`, waiting for the server to start."""
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.communicate()[0]
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.read(), answer.headers["Content-Type"]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize(
    ("stop_signal", "exit_code"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 0)]
)
def test_serve_answers_ok_and_stops_on_a_signal(stop_signal: int, exit_code: int) -> None:
    process, url = start_serve()
    try:
        body, content_type = get_when_up(process, url)
        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=15)
    finally:
        process.kill()

    assert body == b"OK\n"
    assert content_type.startswith("text/plain")
    # uvicorn shuts down gracefully, then re-raises SIGTERM (so a supervisor sees it) and
    # returns normally after SIGINT (Ctrl-C).
    assert process.returncode == exit_code
    assert "Shutting down" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(("flags", "logged"), [((), False), (("--access-log",), True)])
def test_serve_logs_requests_only_when_asked(flags: tuple[str, ...], logged: bool) -> None:
    process, url = start_serve(*flags)
    try:
        get_when_up(process, url)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    finally:
        process.kill()

    assert ('"GET / HTTP/1.1" 200' in output) == logged


def test_serve_help_names_every_environment_variable_it_reads() -> None:
    finished = leaker("serve", "--help")

    assert finished.returncode == 0
    assert finished.stdout.startswith("usage: leaker serve")
    for name in ENVIRONMENT_VARIABLES:
        assert f"  {name}  " in finished.stdout
    assert "--header-timeout" in finished.stdout


@pytest.mark.parametrize(
    "args", [("serve", "--bogus"), ("load", "--bogus", "--url", "http://127.0.0.1:1/")]
)
def test_a_bad_option_shows_its_command_s_usage(args: tuple[str, ...]) -> None:
    finished = leaker(*args)

    assert finished.returncode == 2
    assert finished.stderr.startswith(f"usage: leaker {args[0]} ")
    assert "unrecognized arguments: --bogus" in finished.stderr


@pytest.mark.parametrize("port", ["70000", "-1", "65536", "http"])
def test_serve_with_a_port_out_of_range_is_a_usage_error(port: str) -> None:
    finished = leaker("serve", "--port", port)

    assert finished.returncode == 2
    assert finished.stderr.startswith("usage: leaker serve ")
    assert "--port" in finished.stderr and port in finished.stderr
    assert "Traceback" not in finished.stderr


def test_serve_says_at_startup_which_experiment_it_runs() -> None:
    lines = []
    for env in (
        {"LEAK_MODE": "leaky", "OTEL_TRACES_EXPORTER": "none"},
        {
            "LEAK_MODE": "fixed",
            "PPROF_TRACEMALLOC": "startup",
            "PPROF_TRACEMALLOC_FRAMES": "16",
            "OTEL_TRACES_EXPORTER": "zipkin",
            "OTEL_EXPORTER_ZIPKIN_ENDPOINT": "http://127.0.0.1:1/api/v2/spans",  # nobody there
        },
    ):
        process, url = start_serve(env=env)
        try:
            get_when_up(process, url)
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=15)
        finally:
            process.kill()
        lines.append(output.splitlines()[0])

    print("\n".join(lines))
    leaky, fixed = lines
    assert leaky.startswith("leaker serve: LEAK_MODE=leaky, ")
    assert "tracemalloc (on-demand, 8 frames)" in leaky and "no traces" in leaky
    assert fixed.startswith("leaker serve: LEAK_MODE=fixed, ")
    assert "tracemalloc (startup, 16 frames)" in fixed
    assert "Zipkin at http://127.0.0.1:1/api/v2/spans" in fixed


def test_serve_with_an_invalid_leak_mode_names_the_setting() -> None:
    finished = leaker("serve", "--port", str(free_port()), env={"LEAK_MODE": "sometimes"})

    assert finished.returncode != 0
    assert "LEAK_MODE" in finished.stderr and "leaky, fixed" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_demo_options_and_exit_code_come_from_app_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[argparse.Namespace] = []

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--minutes", type=int)

    def run(args: argparse.Namespace) -> int:
        runs.append(args)
        return 7

    fake_demo = types.SimpleNamespace(add_arguments=add_arguments, run=run)
    monkeypatch.setitem(sys.modules, "app.demo", fake_demo)
    monkeypatch.setattr(app, "demo", fake_demo, raising=False)

    assert main(["demo", "--minutes", "3"]) == 7
    assert [args.minutes for args in runs] == [3]


def test_demo_without_app_demo_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "app.demo", None)  # makes `import app.demo` fail
    monkeypatch.delattr(app, "demo", raising=False)

    assert main(["demo"]) == 2
    assert "demo not available" in capsys.readouterr().err
