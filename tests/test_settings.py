"""Settings come from the environment; a bad value stops the service before it serves anything."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app.settings import Settings, SettingsError
from tests.service import free_port, running_service

ROOT = Path(__file__).resolve().parent.parent
STARTUP_FAILURE_TIMEOUT_SECONDS = 30  # importing FastAPI and OpenTelemetry takes ~1 s

# (variable, bad value, words the error message must show: what the variable accepts)
INVALID_SETTINGS = [
    ("LEAK_MODE", "bogus", ["leaky", "fixed"]),
    ("OTEL_TRACES_EXPORTER", "jaeger", ["zipkin", "console", "none"]),
    ("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "not-a-url", ["http://", "https://"]),
    ("PPROF_ENABLED", "maybe", ["true", "false"]),
    ("PPROF_TRACEMALLOC", "sometimes", ["startup", "on-demand"]),
    ("PPROF_TRACEMALLOC_FRAMES", "0", ["1", "1000"]),
    ("PPROF_TRACEMALLOC_FRAMES", "abc", ["1", "1000"]),
    ("PPROF_TRACEMALLOC_FRAMES", "1001", ["1", "1000"]),
    ("PPROF_TRACEMALLOC_FRAMES", "-5", ["1", "1000"]),
]


def test_an_empty_environment_gives_the_defaults() -> None:
    assert Settings.from_environ({}) == Settings()


def test_empty_values_give_the_defaults() -> None:
    names = [
        "LEAK_MODE",
        "OTEL_SERVICE_NAME",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_ZIPKIN_ENDPOINT",
        "PPROF_ENABLED",
        "PPROF_TRACEMALLOC",
        "PPROF_TRACEMALLOC_FRAMES",
    ]
    assert Settings.from_environ({name: "" for name in names}) == Settings()


def test_valid_values_are_read_in_any_case_and_with_spaces_around() -> None:
    settings = Settings.from_environ(
        {
            "LEAK_MODE": "FIXED",
            "OTEL_SERVICE_NAME": "checkout",
            "OTEL_TRACES_EXPORTER": " Console ",
            "OTEL_EXPORTER_ZIPKIN_ENDPOINT": "https://zipkin.example:9411/api/v2/spans",
            "PPROF_ENABLED": "No",
            "PPROF_TRACEMALLOC": "STARTUP",
            "PPROF_TRACEMALLOC_FRAMES": " 64 ",
        }
    )
    assert settings == Settings(
        leak_mode="fixed",
        service_name="checkout",
        traces_exporter="console",
        zipkin_endpoint="https://zipkin.example:9411/api/v2/spans",
        pprof_enabled=False,
        tracemalloc_start="startup",
        tracemalloc_frames=64,
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True)]
    + [("false", False), ("False", False), ("0", False), ("NO", False)],
)
def test_pprof_enabled_reads_the_usual_spellings_of_a_boolean(value: str, expected: bool) -> None:
    assert Settings.from_environ({"PPROF_ENABLED": value}).pprof_enabled is expected


@pytest.mark.parametrize("frames", ["1", "1000"])
def test_tracemalloc_frames_accepts_both_ends_of_its_range(frames: str) -> None:
    assert Settings.from_environ({"PPROF_TRACEMALLOC_FRAMES": frames}).tracemalloc_frames == int(
        frames
    )


@pytest.mark.parametrize(("name", "value", "allowed"), INVALID_SETTINGS)
def test_an_invalid_value_names_the_variable_and_what_it_accepts(
    name: str, value: str, allowed: list[str]
) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_environ({name: value})
    message = str(raised.value)
    assert name in message
    assert value in message
    for word in allowed:
        assert word in message


@pytest.mark.parametrize(("name", "value", "allowed"), INVALID_SETTINGS)
def test_the_service_refuses_to_start_with_an_invalid_value(
    name: str, value: str, allowed: list[str]
) -> None:
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(free_port())]
    completed = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "none", name: value},
        capture_output=True,
        text=True,
        timeout=STARTUP_FAILURE_TIMEOUT_SECONDS,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output
    assert name in completed.stderr, output
    for word in allowed:
        assert word in completed.stderr, output
    assert "Uvicorn running" not in output  # it never started serving


def test_the_service_starts_with_valid_values_in_any_case(tmp_path: Path) -> None:
    env = {"LEAK_MODE": "FIXED", "PPROF_ENABLED": "Yes", "PPROF_TRACEMALLOC": "On-Demand"}
    with running_service(env, tmp_path) as service:
        with urllib.request.urlopen(service.url + "/", timeout=5) as answer:
            assert answer.status == 200
            assert answer.read() == b"OK\n"


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_pprof_enabled_false_removes_the_endpoints(tmp_path: Path) -> None:
    with running_service({"PPROF_ENABLED": "false"}, tmp_path) as service:
        assert status_of(service.url + "/") == 200
        assert status_of(service.url + "/debug/pprof/") == 404
        assert status_of(service.url + "/debug/pprof/heap") == 404
