"""`leaker serve` closes connections whose request head is late (slowloris), and only those.

uvicorn alone waits forever for a request line and headers trickled a byte at a time, or for a
connection that sends nothing: 50 such sockets were held open for 30 s, and more would hold more.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.service import free_port, stop

ROOT = Path(__file__).resolve().parent.parent
SERVICE_ENV = {"LEAK_MODE": "fixed", "OTEL_TRACES_EXPORTER": "none", "PYTHONUNBUFFERED": "1"}
DEFAULT_HEADER_TIMEOUT_SECONDS = 10  # what `leaker serve --help` promises
SLOWLORIS_SOCKETS = 50
TRICKLE_INTERVAL_SECONDS = 0.5
PARTIAL_HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
KEEP_ALIVE_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@contextmanager
def leaker_serve(*args: str) -> Iterator[tuple[str, int]]:
    """`leaker serve` on a free port; yields its URL and port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), *args],
        cwd=ROOT,
        env={**os.environ, **SERVICE_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "leaker serve exited"
            try:
                with urllib.request.urlopen(url + "/", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "leaker serve did not start"
                time.sleep(0.05)
        yield url, port
    finally:
        stop(process)


def trickle(sock: socket.socket, head: bytes, until: float) -> tuple[float, bytes]:
    """Send `head`, then a header byte at a time until the server closes or `until` passes.

    With an empty `head`, send nothing at all. Returns the seconds from the start to the close
    (inf if still open) and what the server answered.
    """
    started = time.monotonic()
    sock.settimeout(TRICKLE_INTERVAL_SECONDS)
    answer = b""
    try:
        sock.sendall(head)
        while time.monotonic() < until:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                if head:
                    sock.sendall(b"X")  # one more byte of a header name that never ends
                continue
            if not chunk:
                return time.monotonic() - started, answer
            answer += chunk
    except (BrokenPipeError, ConnectionResetError):
        return time.monotonic() - started, answer
    return float("inf"), answer


def receive_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length, read from `sock`."""
    sock.settimeout(10)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(4096)
        assert chunk, f"closed after {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, f"closed after {received!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_hundred_trickled_or_silent_connections_are_closed_and_others_served() -> None:
    closed: list[tuple[float, bytes]] = []
    with leaker_serve() as (url, port):
        until = time.monotonic() + DEFAULT_HEADER_TIMEOUT_SECONDS + 10

        def attack(head: bytes) -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                closed.append(trickle(sock, head, until))

        # Half trickle a head, half send nothing at all.
        heads = [PARTIAL_HEAD, b""] * SLOWLORIS_SOCKETS
        threads = [threading.Thread(target=attack, args=(head,)) for head in heads]
        for thread in threads:
            thread.start()
        time.sleep(1)
        started = time.monotonic()
        with urllib.request.urlopen(url + "/", timeout=5) as answer:  # others are served
            assert answer.read() == b"OK\n"
        served_in = time.monotonic() - started
        for thread in threads:
            thread.join()

    seconds = sorted(took for took, _ in closed)
    print(f"closed after {seconds[0]:.1f} to {seconds[-1]:.1f} s; GET / took {served_in:.3f} s")
    assert len(closed) == 2 * SLOWLORIS_SOCKETS
    # Every one closed, at the timeout: not before, and not when the test gave up on it.
    assert DEFAULT_HEADER_TIMEOUT_SECONDS - 0.5 <= seconds[0]
    assert seconds[-1] < DEFAULT_HEADER_TIMEOUT_SECONDS + 3
    answers = [answer for _, answer in closed]
    # A partial head is told why; a connection that said nothing is just closed.
    assert answers.count(b"") == SLOWLORIS_SOCKETS
    timed_out = [answer for answer in answers if answer]
    assert len(timed_out) == SLOWLORIS_SOCKETS
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in timed_out)


def test_the_head_of_a_kept_alive_connection_s_next_request_is_timed_too() -> None:
    with leaker_serve("--header-timeout", "1") as (_, port):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(KEEP_ALIVE_REQUEST)
            first = receive_response(sock)
            time.sleep(2)  # idle, under uvicorn's keep-alive timeout of 5 s: not closed
            took, answer = trickle(sock, PARTIAL_HEAD, time.monotonic() + 10)

    assert first.startswith(b"HTTP/1.1 200 ")
    assert 1 - 0.3 <= took < 1 + 2  # timed from the next request's first byte
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_request_that_runs_longer_than_the_head_timeout_is_answered() -> None:
    with leaker_serve("--header-timeout", "1") as (url, port):
        started = time.monotonic()
        # A 3 s profile: its head came at once, so the head timeout has nothing to say.
        with urllib.request.urlopen(url + "/debug/pprof/goroutine?seconds=3", timeout=30) as answer:
            assert answer.status == 200
            assert answer.read()
        took = time.monotonic() - started
        # Then the connection keeps serving requests whose heads come whole, however spaced.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for _ in range(3):
                sock.sendall(KEEP_ALIVE_REQUEST)
                assert receive_response(sock).startswith(b"HTTP/1.1 200 ")
                time.sleep(1.5)

    assert took >= 3
