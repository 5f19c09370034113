"""Driving the workshop's compose stack from the tests: Compose, the engine, Prometheus, Zipkin.

Everything goes through the commands and ports a user has: `docker compose` (or Debian's
`docker-compose` 1.29) in the repository's root, `docker inspect` and `docker events`, and the
published ports on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.service import free_port

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "leaker-stack-test"
# The host ports the compose file publishes by default, and the variable that moves each.
DEFAULT_PORTS = {"leaker": 8080, "pprof": 8081, "prometheus": 9090, "zipkin": 9411}
PORT_VARIABLES = {
    "leaker": "LEAKER_PORT",
    "pprof": "PPROF_UI_PORT",
    "prometheus": "PROMETHEUS_PORT",
    "zipkin": "ZIPKIN_PORT",
}
# Variables the compose file reads: the tests set them per step, never from the caller's shell.
COMPOSE_VARIABLES = (
    *PORT_VARIABLES.values(),
    "LEAK_MODE",
    "LEAKER_MEMORY_LIMIT",
    "LEAKER_PUBLISH_ADDRESS",
    "PPROF_TRACEMALLOC",
    "PPROF_HEAP_PROFILER",
    "CLIENT_CONNECTIONS",
)
COMMAND_TIMEOUT_SECONDS = 900  # `up --build` from nothing builds two images


class EngineUnavailable(Exception):
    """No Docker engine answers, or no Compose is installed."""


def compose_command() -> list[str]:
    """`docker compose` (v2) where the plugin exists, else Debian's `docker-compose` (v1)."""
    docker = shutil.which("docker")
    if docker is None:
        raise EngineUnavailable("the docker command is not installed")
    version = subprocess.run([docker, "version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        raise EngineUnavailable(f"no Docker engine answers: {version.stderr.strip()}")
    plugin = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=60
    )
    if plugin.returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone is None:
        raise EngineUnavailable("neither `docker compose` nor `docker-compose` is installed")
    return [standalone]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as servers bind, past TIME_WAIT
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_ports() -> tuple[dict[str, int], list[int]]:
    """The default host ports where they are free (as a user's `docker compose up` gets them);
    any other free port in place of one that is taken. Also returns the taken defaults."""
    taken = [port for port in DEFAULT_PORTS.values() if not port_is_free(port)]
    ports = {
        service: free_port() if port in taken else port for service, port in DEFAULT_PORTS.items()
    }
    return ports, taken


def listeners(ports: Sequence[int]) -> str:
    """What listens on these TCP ports, as `ss` tells (empty where ss is missing)."""
    if shutil.which("ss") is None:
        return ""
    result = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, timeout=30)
    wanted = tuple(f":{port} " for port in ports)
    return "; ".join(
        " ".join(line.split())
        for line in result.stdout.splitlines()
        if any(w in line + " " for w in wanted)
    )


@dataclass
class Stack:
    compose: list[str]
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))  # on 127.0.0.1
    environ: dict[str, str] = field(default_factory=dict)  # compose variables for the next step
    project: str = PROJECT

    def url(self, service: str, path: str = "/") -> str:
        return f"http://localhost:{self.ports[service]}{path}"

    def run(
        self, *arguments: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_SECONDS
    ) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}
        environ.update({PORT_VARIABLES[s]: str(port) for s, port in self.ports.items()})
        environ.update(self.environ, COMPOSE_PROJECT_NAME=self.project)
        result = subprocess.run(
            [*self.compose, *arguments],
            cwd=ROOT,
            env=environ,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert result.returncode == 0, f"{' '.join(arguments)}:\n{result.stdout}{result.stderr}"
        return result

    def container(self, service: str) -> str:
        """The ID of the service's container (one per service here)."""
        ids = self.run("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def inspect(self, service: str) -> dict[str, Any]:
        return docker_json("inspect", self.container(service))[0]

    def logs(self, service: str) -> str:
        result = self.run("logs", "--no-color", service)
        return result.stdout + result.stderr

    def wait_healthy(self, service: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = self.inspect(service)["State"]
            if state.get("Health", {}).get("Status") == "healthy":
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{service} not healthy after {timeout} s: {state}")
            time.sleep(1)


def docker(*arguments: str, timeout: float = 120) -> str:
    result = subprocess.run(["docker", *arguments], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"docker {' '.join(arguments)}:\n{result.stderr}"
    return result.stdout


def docker_json(*arguments: str) -> Any:
    return json.loads(docker(*arguments))


def events(since: float, until: float, filters: Sequence[str]) -> list[dict[str, Any]]:
    """`docker events` between two Unix times, as dicts, oldest first."""
    arguments = ["events", "--since", f"{since:.3f}", "--until", f"{until:.3f}"]
    for item in filters:
        arguments += ["--filter", item]
    arguments += ["--format", "{{json .}}"]
    return [json.loads(line) for line in docker(*arguments).splitlines() if line.strip()]


def get(url: str, timeout: float = 30, headers: Mapping[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return answer.read()


def get_json(url: str, timeout: float = 30) -> Any:
    return json.loads(get(url, timeout))


# -- Prometheus's HTTP API ------------------------------------------------------------------------


def raw_samples(
    prometheus: str, metric: str, start: float, end: float, optional: bool = False
) -> list[tuple[float, float]]:
    """Every sample Prometheus stored for `metric` between two times (one series; none is
    allowed if `optional`)."""
    seconds = max(int(end - start), 1)
    parameters = urllib.parse.urlencode({"query": f"{metric}[{seconds}s]", "time": end})
    answer = get_json(f"{prometheus}/api/v1/query?{parameters}")
    assert answer["status"] == "success", answer
    series = answer["data"]["result"]
    if optional and not series:
        return []
    assert len(series) == 1, f"{metric}: {len(series)} series"
    return [(float(t), float(v)) for t, v in series[0]["values"] if float(t) >= start]


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (time, value) points, per minute."""
    count = len(points)
    assert count >= 2, points
    mean_t = sum(t for t, _ in points) / count
    mean_v = sum(v for _, v in points) / count
    covariance = sum((t - mean_t) * (v - mean_v) for t, v in points)
    variance = sum((t - mean_t) ** 2 for t, _ in points)
    return covariance / variance * 60


# -- Zipkin's API ---------------------------------------------------------------------------------


def zipkin_spans(zipkin: str, service: str, limit: int) -> list[dict[str, Any]]:
    """The spans of the newest `limit` traces that have a span of `service`."""
    parameters = urllib.parse.urlencode({"serviceName": service, "limit": limit})
    traces = get_json(f"{zipkin}/api/v2/traces?{parameters}")
    return [span for trace in traces for span in trace]


def zipkin_span_names(zipkin: str, service: str) -> set[str]:
    """Every span name Zipkin holds for `service`, lowercase (as Zipkin keeps them)."""
    parameters = urllib.parse.urlencode({"serviceName": service})
    return {name.lower() for name in get_json(f"{zipkin}/api/v2/spans?{parameters}")}


def zipkin_received(zipkin: str) -> dict[str, Any] | None:
    """The Zipkin stand-in's counts of what it stored (.ci/stand-ins/zipkin_stand_in.py); None
    from a real Zipkin, which has no such API."""
    try:
        return get_json(f"{zipkin}/stand-in/received")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


# -- The client ---------------------------------------------------------------------------------


def client_answered(logs: str) -> tuple[int, int]:
    """2xx answers the client counted, over every round in its logs, and the number of rounds.

    Each `leaker load` round ends with its summary, `statuses:    200: 41873`, also when
    `compose stop` ends it (the client's shell passes SIGTERM on)."""
    rounds = re.findall(r"^.*statuses: +(.*)$", logs, re.MULTILINE)
    answered = sum(
        int(count)
        for statuses in rounds
        for status, count in re.findall(r"(\d+): (\d+)", statuses)
        if status.startswith("2")
    )
    return answered, len(rounds)
