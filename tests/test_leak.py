"""The leak, counted in-process: leaky mode keeps ~1 KB per request, fixed mode keeps nothing.

These tests also guard against dependency drift: the demo leaks only because OpenTelemetry's
global proxy meter provider keeps every meter it hands out. If an upgrade changes that, the
tests say so, and say which of the two facts (memory, meters) stopped holding.

Each mode runs in a fresh process (tests/leak_probe.py), since that proxy provider is global.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODES = ("leaky", "fixed")
REQUESTS = 2000
PROBE_TIMEOUT_SECONDS = 600  # tracemalloc slows requests ~20x; ~30 s per mode on 2 busy cores

Probe = dict[str, Any]


@pytest.fixture(scope="module")
def probes() -> dict[str, Probe]:
    """Both modes' measurements, run side by side in two subprocesses."""
    processes = {}
    for mode in MODES:
        # Importing app.main also builds the module's own app from the environment; keep that
        # one from exporting traces to a Zipkin that is not there.
        env = {**os.environ, "LEAK_MODE": mode, "OTEL_TRACES_EXPORTER": "none"}
        command = [sys.executable, "-m", "tests.leak_probe", mode, "--requests", str(REQUESTS)]
        processes[mode] = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results = {}
    for mode, process in processes.items():
        stdout, stderr = process.communicate(timeout=PROBE_TIMEOUT_SECONDS)
        assert process.returncode == 0, f"{mode} probe failed:\n{stderr}"
        results[mode] = json.loads(stdout)
        print(f"{mode}: {json.dumps(results[mode], indent=2)}")
    return results


def test_leaky_mode_keeps_memory_for_every_request_and_fixed_mode_does_not(
    probes: dict[str, Probe],
) -> None:
    leaky = probes["leaky"]["retained_bytes"]
    fixed = probes["fixed"]["retained_bytes"]
    print(
        f"retained over {REQUESTS} requests: leaky {leaky} bytes ({leaky / REQUESTS:.0f}/request), "
        f"fixed {fixed} bytes ({fixed / REQUESTS:.1f}/request)"
    )
    assert leaky >= 500_000
    assert fixed < 0.05 * leaky


def test_leaky_mode_adds_a_proxy_meter_per_request_and_fixed_mode_adds_none(
    probes: dict[str, Probe],
) -> None:
    leaky_added = probes["leaky"]["proxy_meters_after"] - probes["leaky"]["proxy_meters_before"]
    fixed_added = probes["fixed"]["proxy_meters_after"] - probes["fixed"]["proxy_meters_before"]
    print(f"proxy meters added over {REQUESTS} requests: leaky {leaky_added}, fixed {fixed_added}")
    # One OpenTelemetryMiddleware per request asks the proxy provider for one meter.
    assert REQUESTS <= leaky_added < 2 * REQUESTS
    assert fixed_added == 0
    # The fixed app's single wrapper was built before the measurement, and holds its meter.
    assert probes["fixed"]["proxy_meters_before"] >= 1


def test_the_largest_growth_in_leaky_mode_comes_from_the_per_request_wrapper(
    probes: dict[str, Probe],
) -> None:
    traceback = probes["leaky"]["largest_group_traceback"]
    print("largest growth, most recent call first:\n  " + "\n  ".join(traceback))
    frames = [frame.replace(os.sep, "/") for frame in traceback]
    assert any("opentelemetry/metrics/_internal/" in frame for frame in frames)
    assert any(frame.startswith(f"{ROOT.as_posix()}/app/main.py:") for frame in frames)
    # It grows with the requests: at least one block kept per request.
    assert probes["leaky"]["largest_group_blocks"] >= REQUESTS
