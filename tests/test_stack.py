"""The Docker stack's files agree with one another and with the service, checked without Docker.

docker-compose.yml, the Dockerfiles and prometheus/prometheus.yml are read and cross-checked here,
and the image's own commands (its CMD and its health check) are run natively, from the project's
venv, against a real server. tests/test_stack_live.py runs the stack itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import opentelemetry.metrics._internal as otel_metrics_internal
import pytest
import yaml

from app.settings import Settings
from tests.service import free_port, stop
from tests.stack import DEFAULT_PORTS, PORT_VARIABLES

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
WORKSHOP_SERVICES = {"leaker", "client", "pprof", "prometheus", "zipkin"}
# `${NAME}` or `${NAME:-default}`, as compose interpolates them.
SUBSTITUTION = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
RELEASE_TAG = re.compile(r"[a-z0-9./-]+:v?\d+\.\d+\.\d+(-[a-z]+)*")
BYTE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def read_dockerfile(path: Path = ROOT / "Dockerfile") -> list[Instruction]:
    """Dockerfile instructions: continuation lines joined, comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        pending = ""
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_arguments(keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction of the image's last (run) stage."""
    instructions = read_dockerfile()
    last_from = max(n for n, i in enumerate(instructions) if i.keyword == "FROM")
    return [i.arguments for i in instructions[last_from:] if i.keyword == keyword]


def base_images(path: Path = ROOT / "Dockerfile") -> list[str]:
    return [i.arguments.split()[0] for i in read_dockerfile(path) if i.keyword == "FROM"]


def only(values: list[str]) -> str:
    assert len(values) == 1, values
    return values[0]


def image_command() -> list[str]:
    """The exec-form CMD, e.g. ["leaker", "serve", "--port", "8080"]."""
    return json.loads(only(dockerfile_arguments("CMD")))


def image_health_check() -> list[str]:
    """The exec-form command after `HEALTHCHECK [options] CMD`."""
    _, separator, command = only(dockerfile_arguments("HEALTHCHECK")).partition(" CMD ")
    assert separator, "HEALTHCHECK must run a command"
    return json.loads(command)


def image_environment() -> dict[str, str]:
    environment: dict[str, str] = {}
    for arguments in dockerfile_arguments("ENV"):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            environment[name] = value
    return environment


def exposed_port() -> int:
    return int(only(dockerfile_arguments("EXPOSE")).removesuffix("/tcp"))


def option_value(command: list[str], option: str) -> str:
    assert option in command, f"{option} missing from {command}"
    return command[command.index(option) + 1]


def with_option(command: list[str], option: str, value: str) -> list[str]:
    index = command.index(option)
    return [*command[: index + 1], value, *command[index + 2 :]]


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose's `${NAME:-default}`: the variable when set and not empty, else the default."""
    return SUBSTITUTION.sub(lambda match: environ.get(match[1]) or match[2] or "", value)


def parse_bytes(size: str) -> int:
    match = re.fullmatch(r"(\d+)([kmg]?)b?", size.lower())
    assert match, f"not a memory size: {size!r}"
    return int(match[1]) * BYTE_UNITS[match[2]]


def container_ports(
    service: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[int, int]:
    """Published `[ADDRESS:]HOST:CONTAINER` ports, container port -> host port."""
    mapping: dict[int, int] = {}
    for entry in service.get("ports", []):
        *_, host, container = interpolate(str(entry), environ or {}).split(":")
        mapping[int(container)] = int(host)
    return mapping


def published_addresses(service: Mapping[str, Any], environ: Mapping[str, str]) -> set[str]:
    """The host addresses the service's ports are published on (none given: every interface)."""
    addresses = set()
    for entry in service.get("ports", []):
        parts = interpolate(str(entry), environ).split(":")
        addresses.add(parts[0] if len(parts) == 3 else "0.0.0.0")
    return addresses


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


@pytest.fixture(scope="module")
def leaker_scrape() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "leaker"]
    return only(jobs)


def test_compose_has_the_workshop_services(services: dict[str, Any]) -> None:
    assert set(services) == WORKSHOP_SERVICES


def test_every_image_is_pinned_to_a_release(services: dict[str, Any]) -> None:
    built_here = {service["image"] for service in services.values() if "build" in service}
    for name, service in services.items():
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file(), name
            for base in base_images(ROOT / service["build"] / "Dockerfile"):
                assert RELEASE_TAG.fullmatch(base), f"{name}: FROM {base}"
        else:
            image = service["image"]
            assert image in built_here or RELEASE_TAG.fullmatch(image), f"{name}: {image}"
    build_stage, run_stage = base_images()
    assert re.fullmatch(r"python:3\.11\.\d+-bookworm", build_stage), build_stage
    assert run_stage == build_stage.replace("-bookworm", "-slim-bookworm"), run_stage


def test_one_image_serves_both_the_service_and_the_client(services: dict[str, Any]) -> None:
    assert services["leaker"]["build"] == "."
    assert "build" not in services["client"]
    assert services["client"]["image"] == services["leaker"]["image"]


def test_every_port_is_published_on_loopback_unless_told_otherwise(
    services: dict[str, Any],
) -> None:
    for name, service in services.items():
        if "ports" in service:
            assert published_addresses(service, {}) == {"127.0.0.1"}, name
            wider = published_addresses(service, {"LEAKER_PUBLISH_ADDRESS": "0.0.0.0"})
            assert wider == {"0.0.0.0"}, name
    # The override is documented where a user reads the stack (the compose file's head).
    assert "LEAKER_PUBLISH_ADDRESS=0.0.0.0" in (ROOT / "docker-compose.yml").read_text()


def test_each_host_port_moves_with_its_variable_and_only_that(services: dict[str, Any]) -> None:
    for name, default in DEFAULT_PORTS.items():
        assert container_ports(services[name]) == {default: default}, name
        moved = {PORT_VARIABLES[name]: "18000"}
        assert container_ports(services[name], moved) == {default: 18000}, name
        for other in DEFAULT_PORTS.keys() - {name}:
            assert container_ports(services[other], moved) == {
                DEFAULT_PORTS[other]: DEFAULT_PORTS[other]
            }
    for variable in PORT_VARIABLES.values():  # documented where a user reads the stack
        assert variable in (ROOT / "docker-compose.yml").read_text().split("services:")[0]
        assert variable in (ROOT / "README.md").read_text()


def test_prometheus_scrapes_the_port_the_service_listens_on(
    services: dict[str, Any], leaker_scrape: dict[str, Any]
) -> None:
    target = only(only(leaker_scrape["static_configs"])["targets"])
    host, _, port_text = target.partition(":")
    port = int(port_text)
    assert services[host].get("build") == ".", "the scrape target must be the service's own image"
    assert port == exposed_port()
    assert option_value(image_command(), "--port") == str(port)
    assert port in container_ports(services[host])
    assert leaker_scrape["metrics_path"] == "/metrics"


def test_compose_mounts_the_prometheus_config(services: dict[str, Any]) -> None:
    mount = "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert mount in services["prometheus"]["volumes"]
    assert (ROOT / "prometheus" / "prometheus.yml").is_file()
    assert container_ports(services["prometheus"]) == {9090: 9090}
    assert container_ports(services["zipkin"]) == {9411: 9411}


def test_promtool_accepts_the_prometheus_config(require_tool: Callable[[str], str]) -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", "prometheus/prometheus.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_leaker_memory_is_limited_and_the_service_restarted(services: dict[str, Any]) -> None:
    leaker = services["leaker"]
    limit = leaker.get("mem_limit") or leaker["deploy"]["resources"]["limits"]["memory"]
    assert parse_bytes(interpolate(limit, {})) == 256 * 2**20
    assert interpolate(limit, {"LEAKER_MEMORY_LIMIT": "1g"}) == "1g"
    assert leaker["restart"] == "unless-stopped"


def test_compose_environment_passes_the_service_settings(services: dict[str, Any]) -> None:
    environment = services["leaker"]["environment"]
    default = Settings.from_environ({k: interpolate(v, {}) for k, v in environment.items()})
    assert default.leak_mode == "leaky"
    assert default.heap_profiler == "sampling"  # the workshop runs at full speed
    tracemalloc = {"PPROF_HEAP_PROFILER": "tracemalloc"}  # the exact profiler: one variable away
    exact = Settings.from_environ({k: interpolate(v, tracemalloc) for k, v in environment.items()})
    assert (exact.heap_profiler, exact.tracemalloc_start) == ("tracemalloc", "startup")
    zipkin = urllib.parse.urlsplit(default.zipkin_endpoint)
    assert zipkin.hostname in services
    assert zipkin.port in container_ports(services[zipkin.hostname])
    assert zipkin.path == "/api/v2/spans"
    fixed_environ = {"LEAK_MODE": "fixed"}
    fixed = Settings.from_environ(
        {k: interpolate(v, fixed_environ) for k, v in environment.items()}
    )
    assert fixed.leak_mode == "fixed"
    image = Settings.from_environ(image_environment())
    assert (image.heap_profiler, image.tracemalloc_start) == ("sampling", "startup")


def test_client_loads_the_service_once_it_is_healthy(
    services: dict[str, Any], leaker_scrape: dict[str, Any]
) -> None:
    client = services["client"]
    assert client["depends_on"]["leaker"]["condition"] == "service_healthy"
    assert services["leaker"]["healthcheck"]["test"] == ["CMD", *image_health_check()]
    load_command = " ".join(client["command"])
    url = re.search(r"--url (\S+)", load_command)
    assert url, load_command
    target = only(only(leaker_scrape["static_configs"])["targets"])
    assert url[1] == f"http://{target}/"
    # A few connections keep the service busy while a scrape waits behind at most that many.
    assert "--concurrency $${CLIENT_CONNECTIONS}" in load_command  # $$: the shell's variable
    connections = interpolate(client["environment"]["CLIENT_CONNECTIONS"], {})
    assert 1 <= int(connections) <= 8


def test_dockerfile_runs_unprivileged_from_the_lock_only() -> None:
    user = only(dockerfile_arguments("USER"))
    assert user not in ("root", "0")
    installs = [run for run in dockerfile_arguments("RUN") if "pip install" in run]
    # The lock without its local line, then the build stage's wheels, resolving nothing more.
    from_lock = [run for run in installs if "requirements.txt" in run]
    assert from_lock, installs
    assert all(run in from_lock or "--no-deps" in run for run in installs), installs
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    copies = [i.arguments for i in read_dockerfile() if i.keyword == "COPY"]
    for copy in copies:
        if copy.startswith("--from="):
            continue  # from the build stage, not the context
        for source in copy.split()[:-1]:
            assert any(
                entry in (f"!{source}", f"!{source}/") or entry.startswith(f"!{source}/")
                for entry in allowed
            ), f"{source} not in context"


def in_docker_context(path: str, ignore: list[str]) -> bool:
    """Whether .dockerignore's allow-list (`*`, then `!path` entries) lets a file in."""
    allowed = [entry[1:].rstrip("/") for entry in ignore if entry.startswith("!")]
    return any(path == entry or path.startswith(entry + "/") for entry in allowed)


def test_everything_the_library_builds_from_is_in_the_docker_context() -> None:
    """setup.py once was not, and the image's wheel came without the sampler's C extension."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    tracked = subprocess.run(
        ["git", "ls-files", "asgi-pprof"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    needed = [path for path in tracked if not path.startswith("asgi-pprof/tests/")]
    assert "asgi-pprof/setup.py" in needed and "asgi-pprof/src/asgi_pprof/_memprof.c" in needed
    assert [path for path in needed if not in_docker_context(path, ignore)] == []
    # pip treats the extension as optional; the image must not.
    assert any("import asgi_pprof._memprof" in run for run in dockerfile_arguments("RUN"))


@dataclass
class NativeImage:
    url: str
    port: int
    environ: dict[str, str]


@pytest.fixture(scope="module")
def native_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NativeImage]:
    """The image's CMD run on this machine: the venv's bin on PATH, the image's ENV, a free port."""
    port = free_port()
    command = with_option(image_command(), "--port", str(port))
    command = with_option(command, "--host", "127.0.0.1")  # loopback here, not every interface
    environ = {
        **os.environ,
        **image_environment(),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    workdir = tmp_path_factory.mktemp("image-command")
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env=environ, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{command} exited with {process.returncode}:\n"
                    f"{log_path.read_text(errors='replace')}"
                )
            try:
                with urllib.request.urlopen(url + "/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{command} did not answer within 60 s") from None
                time.sleep(0.1)
        yield NativeImage(url, port, environ)
    finally:
        stop(process)


def test_image_command_serves_ok(native_image: NativeImage) -> None:
    with urllib.request.urlopen(native_image.url + "/", timeout=10) as answer:
        assert answer.status == 200
        assert answer.read() == b"OK\n"


def test_image_command_serves_the_metric_the_workshop_graphs(
    native_image: NativeImage, leaker_scrape: dict[str, Any]
) -> None:
    url = native_image.url + leaker_scrape["metrics_path"]
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        assert b"\nprocess_resident_memory_bytes " in answer.read()


def run_health_check(port: int, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    listening = f":{exposed_port()}/"
    command = image_health_check()
    assert any(listening in part for part in command), command
    command = [part.replace(listening, f":{port}/") for part in command]
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=30)


def test_image_health_check_passes_against_the_service(native_image: NativeImage) -> None:
    result = run_health_check(native_image.port, native_image.environ)
    assert result.returncode == 0, result.stderr


def test_image_health_check_fails_when_nothing_listens(native_image: NativeImage) -> None:
    result = run_health_check(free_port(), native_image.environ)
    assert result.returncode != 0


def test_branches_links_point_at_the_stack(
    services: dict[str, Any], leaker_scrape: dict[str, Any]
) -> None:
    text = (ROOT / "branches.md").read_text()
    published = {
        host for service in services.values() for host in container_ports(service).values()
    }
    ports = {int(port) for port in re.findall(r"localhost:(\d+)", text)}
    assert ports and ports <= published, (ports, published)
    graph = re.search(r"http://localhost:9090/graph\?\S+?(?=[)\s>`])", text)
    assert graph, "branches.md needs a ready Prometheus query link"
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(graph[0]).query)
    assert f'job="{leaker_scrape["job_name"]}"' in query["g0.expr"][0]


def test_branches_diff_and_citations_match_the_code() -> None:
    text = (ROOT / "branches.md").read_text()
    diff = re.search(r"```diff\n(.*?)```", text, re.DOTALL)
    assert diff, "branches.md needs the leaky -> fixed diff"
    changed = [line for line in diff[1].splitlines() if line.startswith(("-", "+"))]
    assert [line[0] for line in changed] == ["-", "+"], changed
    main_lines = {line.strip() for line in (ROOT / "app" / "main.py").read_text().splitlines()}
    for line in changed:
        assert any(code.startswith(line[1:].strip()) for code in main_lines), line
    # The OpenTelemetry lines the explanation cites, in the installed (pinned) release.
    source = Path(otel_metrics_internal.__file__).read_text()
    for cited in (
        "class _ProxyMeterProvider(",
        "self._meters.append(meter)",
        "class _ProxyMeter(",
        "def create_histogram(",
        "self._instruments.append(proxy)",
    ):
        assert cited in source, cited


def test_the_pprof_ui_reads_the_source_the_service_runs(services: dict[str, Any]) -> None:
    """Its source view: the profile names files where the image installs them (site-packages of
    the image's Python), which pprof trims to find them under -source_path, where the compose file
    mounts the service's code."""
    pprof_dockerfile = ROOT / "pprof" / "Dockerfile"
    entrypoint = json.loads(
        only([i.arguments for i in read_dockerfile(pprof_dockerfile) if i.keyword == "ENTRYPOINT"])
    )
    flags = dict(flag.partition("=")[::2] for flag in entrypoint if flag.startswith("-"))
    python = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-bookworm", base_images()[-1])
    assert python, base_images()
    assert flags["-trim_path"] == f"/usr/local/lib/python{python[1]}/site-packages"
    assert f"./app:{flags['-source_path']}/app:ro" in services["pprof"]["volumes"]
    # The first page is the growth over a minute (not the heap at startup), at line level.
    assert flags["-seconds"] == "60" and "-lines" in flags
