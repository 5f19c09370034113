"""`leaker demo` stopped early, by a signal or a service that cannot start, and with Zipkin set:
both services end, and the exit status says why."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_demo import DEMO_TIMEOUT_SECONDS, LEAKER, ROOT, is_gone, service_pids
from tests.zipkin_receiver import zipkin_receiver


def run_until(line_start: str, tmp_path: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """Start the demo and read its output up to a line starting with `line_start`."""
    process = subprocess.Popen(
        [*LEAKER, "demo", "--duration", "60", "--output", str(tmp_path / "out")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(line_start):
            return process, lines
    process.kill()
    pytest.fail(f"no line starting {line_start!r} in:\n{''.join(lines)}")


@pytest.mark.parametrize(
    ("when", "sent", "status"),
    [
        ("Loading both at once", signal.SIGINT, 130),
        ("Taking the first heap profiles", signal.SIGTERM, 128 + signal.SIGTERM),
        ("Started the fixed service", signal.SIGINT, 130),
    ],
)
def test_a_signal_mid_run_stops_both_services_and_exits(
    when: str, sent: signal.Signals, status: int, tmp_path: Path
) -> None:
    process, lines = run_until(when, tmp_path)
    time.sleep(1.0)
    process.send_signal(sent)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stdout + stderr
    assert f"leaker demo: {sent.name}: stopping the services." in stderr
    pids = service_pids("".join(lines) + stdout)
    assert len(pids) == 2
    assert all(is_gone(pid) for pid in pids)


def test_with_zipkin_set_both_services_send_their_traces_and_the_story_holds(
    tmp_path: Path,
) -> None:
    with zipkin_receiver() as zipkin:
        finished = subprocess.run(
            [*LEAKER, "demo", "--requests", "200", "--output", str(tmp_path / "out")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT_SECONDS,
            env={**os.environ, "OTEL_EXPORTER_ZIPKIN_ENDPOINT": zipkin.endpoint},
        )
        spans = zipkin.received()
        assert zipkin.rejected() == []
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"Traces go to Zipkin at {zipkin.endpoint}." in finished.stdout
    services = {span["localEndpoint"]["serviceName"] for span in spans}
    assert services == {"leaker-leaky", "leaker-fixed"}
    server_spans = [span for span in spans if span.get("kind") == "SERVER"]
    # every request of the load, the warm-up and the demo's own requests has a SERVER span
    assert len(server_spans) >= 2 * 200


def test_a_service_that_cannot_start_is_reported(tmp_path: Path) -> None:
    finished = subprocess.run(
        [*LEAKER, "demo", "--requests", "10", "--output", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OTEL_EXPORTER_ZIPKIN_ENDPOINT": "ftp://nowhere"},
    )
    assert finished.returncode == 2
    assert "service exited with status" in finished.stderr
    assert "OTEL_EXPORTER_ZIPKIN_ENDPOINT" in finished.stderr
    assert all(is_gone(pid) for pid in service_pids(finished.stdout))
