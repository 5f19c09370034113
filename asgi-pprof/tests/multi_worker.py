"""A service started for real as several worker processes (uvicorn --workers, gunicorn's uvicorn
worker) with PPROF_MULTIPROC_DIR: its worker pids, their sockets, and its merged profiles."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pprof_decode import decode, samples
from server import Server, serving

WORKERS = 3
DEADLINE_SECONDS = 120.0  # for what a busy machine may take: workers starting, replaced
# The supervisors' own checks of a worker, made long: a test stops one with SIGSTOP, and neither
# may kill it for not answering meanwhile.
SERVER_ARGS = {
    "uvicorn": ["--workers", str(WORKERS), "--timeout-worker-healthcheck", "600"],
    "gunicorn": [
        "-k", "uvicorn.workers.UvicornWorker", "-w", str(WORKERS),
        "--timeout", "600", "--graceful-timeout", "5",
    ],
}  # fmt: skip


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes

    def profile(self) -> Any:
        return decode(self.body)

    def pids(self) -> set[int]:
        """The `pid` labels of the profile's samples."""
        return {int(sample.labels["pid"]) for sample in samples(self.profile())}

    def merged(self) -> set[int]:
        """The workers that the answer says it merged."""
        return {int(pid) for pid in self.headers.get("x-pprof-workers", "").split()}


@dataclass
class Service:
    server: Server
    kind: str
    directory: Path

    def workers(self) -> set[int]:
        """The live worker processes: the server's children (uvicorn's, less multiprocessing's
        resource tracker)."""
        found = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    command = cmdline.read()
            except OSError:
                continue
            state, parent = fields[0], int(fields[1])
            if parent != self.server.process.pid or state == "Z":
                continue
            if self.kind == "uvicorn" and b"spawn_main" not in command:
                continue
            found.add(int(entry))
        return found

    def sockets(self) -> set[str]:
        return set(os.listdir(self.directory))

    def settled(self) -> set[int]:
        """The worker pids, once there are WORKERS of them, each serving its socket, and no
        other socket left in the directory."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            workers = self.workers()
            if len(workers) == WORKERS and self.sockets() == {f"{pid}.sock" for pid in workers}:
                return workers
            if time.monotonic() > deadline:
                pytest.fail(f"workers {workers}, sockets {self.sockets()}:\n{self.server.log()}")
            time.sleep(0.1)

    def get(self, path: str, timeout: float = 120) -> Fetched:
        request = urllib.request.Request(self.server.url + path)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return Fetched(answer.status, _lower(answer.headers.items()), answer.read())
        except urllib.error.HTTPError as error:
            return Fetched(error.code, _lower(error.headers.items()), error.read())


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


@contextmanager
def multi_worker_service(
    kind: str, tmp_path: Path, app: str = "workers_service:app", timeout_seconds: int = 60
) -> Iterator[Service]:
    """`kind` ("uvicorn" or "gunicorn") serving `app` as WORKERS workers that answer together;
    a worker has `timeout_seconds` beyond a profile's duration to answer."""
    directory = tmp_path / "pprof"
    directory.mkdir()
    env = {
        "PPROF_MULTIPROC_DIR": str(directory),
        "PPROF_MULTIPROC_TIMEOUT_SECONDS": str(timeout_seconds),
    }
    with serving(
        app, tmp_path, env=env, server_args=SERVER_ARGS[kind], gunicorn=kind == "gunicorn"
    ) as server:
        service = Service(server, kind, directory)
        service.settled()
        yield service
