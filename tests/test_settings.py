"""Settings come from the environment; a bad value stops the service before it serves anything."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app.settings import ENVIRONMENT_VARIABLES, Settings, SettingsError
from tests.service import free_port, running_service
from tests.zipkin_receiver import zipkin_receiver

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
    ("PPROF_TRACEMALLOC_FRAMES", "²", ["1", "1000"]),  # isdigit() says yes, int() says no
    ("PPROF_TRACEMALLOC_FRAMES", "٣", ["1", "1000"]),  # an Arabic-Indic 3, which int() reads
    ("PPROF_TRACEMALLOC_FRAMES", "+8", ["1", "1000"]),
    ("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://", ["http://", "https://", "host"]),
    ("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://[::1", ["http://", "https://", "host"]),
    ("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://localhost:99999/x", ["http://", "65535"]),
    ("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://localhost:0/x", ["http://", "65535"]),
    ("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://a b/", ["http://", "https://", "host"]),
    ("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "ftp://zipkin/", ["http://", "https://"]),
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


# Each starts a Python process: one value per variable, and those that used to end in a traceback.
SERVICE_REFUSALS = [
    case
    for case in INVALID_SETTINGS
    if case[1] in ("bogus", "jaeger", "not-a-url", "maybe", "sometimes", "0", "²", "http://[::1")
]


@pytest.mark.parametrize(("name", "value", "allowed"), SERVICE_REFUSALS)
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
    assert "Traceback" not in output
    assert "Uvicorn running" not in output  # it never started serving


def test_a_value_with_thousands_of_digits_is_refused_in_a_short_message() -> None:
    value = "1" * 5000  # int() refuses more than 4,300 digits, with a traceback
    with pytest.raises(SettingsError) as raised:
        Settings.from_environ({"PPROF_TRACEMALLOC_FRAMES": value})
    message = str(raised.value)
    assert "PPROF_TRACEMALLOC_FRAMES" in message and "from 1 to 1000" in message
    assert "5000 characters" in message
    assert len(message) < 200


@pytest.mark.parametrize(
    "endpoint",
    [
        "HTTP://zipkin:9411/api/v2/spans",  # schemes are case-insensitive
        "Https://zipkin.example/api/v2/spans",
        "http://[::1]:9411/api/v2/spans",
        "http://zipkin/api/v2/spans",
        "http://user:secret@zipkin:9411/api/v2/spans",
    ],
)
def test_a_zipkin_endpoint_with_a_host_is_accepted_as_given(endpoint: str) -> None:
    settings = Settings.from_environ({"OTEL_EXPORTER_ZIPKIN_ENDPOINT": endpoint})
    assert settings.zipkin_endpoint == endpoint


def test_spans_reach_an_endpoint_written_in_capitals(tmp_path: Path) -> None:
    with zipkin_receiver() as receiver:
        endpoint = receiver.endpoint.replace("http://", "HTTP://")
        env = {"OTEL_TRACES_EXPORTER": "zipkin", "OTEL_EXPORTER_ZIPKIN_ENDPOINT": endpoint}
        with running_service(env, tmp_path) as service:
            assert status_of(service.url + "/") == 200
            deadline = time.monotonic() + 30  # the batch processor exports every 5 s
            while not receiver.received() and time.monotonic() < deadline:
                time.sleep(0.1)
        assert receiver.received()
        assert receiver.rejected() == []


class RecordingEnvironment(dict[str, str]):
    """An empty environment that remembers every name it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, name: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(name)
        return super().get(name, default)

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        return super().__getitem__(name)


def test_every_variable_read_is_documented_for_serve_help() -> None:
    environ = RecordingEnvironment()
    Settings.from_environ(environ)

    assert environ.asked  # the recording works
    assert environ.asked == set(ENVIRONMENT_VARIABLES)


def test_the_startup_line_names_the_mode_the_profiler_and_where_traces_go() -> None:
    default = Settings().describe()
    assert "LEAK_MODE=leaky" in default
    assert "tracemalloc (on-demand, 8 frames)" in default
    assert "Zipkin at http://localhost:9411/api/v2/spans" in default

    other = Settings.from_environ(
        {
            "LEAK_MODE": "fixed",
            "PPROF_TRACEMALLOC": "startup",
            "PPROF_TRACEMALLOC_FRAMES": "32",
            "OTEL_SERVICE_NAME": "checkout",
            "OTEL_EXPORTER_ZIPKIN_ENDPOINT": "http://ops:s3cret@zipkin:9411/api/v2/spans",
        }
    ).describe()
    assert "LEAK_MODE=fixed" in other and "tracemalloc (startup, 32 frames)" in other
    assert "'checkout'" in other
    assert "http://ops:***@zipkin:9411/api/v2/spans" in other and "s3cret" not in other
    assert "\n" not in other

    quiet = Settings(pprof_enabled=False, traces_exporter="none").describe()
    assert "PPROF_ENABLED=false" in quiet and "OTEL_TRACES_EXPORTER=none" in quiet
    assert "console" in Settings(traces_exporter="console").describe()


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
