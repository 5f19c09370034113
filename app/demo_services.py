"""The demo's two services: uvicorn processes of their own, started, probed and stopped from here.

Each runs in its own process group, so that stopping it stops all of it and a Ctrl-C at the
terminal reaches only the demo, which then stops the services itself. Their resident memory is
read from outside (/proc, else `ps`), so that measuring sends the leaky service no requests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import app as app_package

PACKAGE_ROOT = Path(app_package.__file__).resolve().parent.parent  # holds the `app` package
# With Zipkin, spans are exported this often: before the last profile, a second after the load.
BATCH_EXPORT_MILLISECONDS = 500
STARTUP_TIMEOUT_SECONDS = 60.0
PROFILE_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 5.0


@dataclass
class Service:
    mode: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM to the service's process group, SIGKILL if it lingers; waits for the end."""
        for sent in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sent)  # its own group: start_new_session below
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
                return
            except subprocess.TimeoutExpired:
                continue


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_environment(mode: str, frames: int) -> dict[str, str]:
    env = {
        **os.environ,
        "LEAK_MODE": mode,
        "OTEL_SERVICE_NAME": f"leaker-{mode}",
        "PPROF_ENABLED": "true",
        "PPROF_TRACEMALLOC": "startup",
        "PPROF_TRACEMALLOC_FRAMES": str(frames),
        "PYTHONUNBUFFERED": "1",
    }
    # Traces go to Zipkin only if the user says where it is; otherwise nowhere.
    if env.get("OTEL_EXPORTER_ZIPKIN_ENDPOINT"):
        env["OTEL_TRACES_EXPORTER"] = "zipkin"
        # Spans wait in the batch queue until the next export (every 5 s by default): sooner,
        # and they are gone by the last profile, which comes SETTLE_SECONDS after the load.
        env.setdefault("OTEL_BSP_SCHEDULE_DELAY", str(BATCH_EXPORT_MILLISECONDS))
    else:
        env["OTEL_TRACES_EXPORTER"] = "none"
    return env


def start_service(mode: str, frames: int, output: Path) -> Service:
    """`uvicorn app.main:app` in its own process group, so that stopping it stops all of it and a
    Ctrl-C at the terminal reaches only the demo, which then stops the services itself."""
    port = free_port()
    log_path = output / f"{mode}.log"
    command = [
        sys.executable, "-m", "uvicorn", "app.main:app",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=PACKAGE_ROOT,  # the services run the same `app` as this demo
            env=service_environment(mode, frames),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(mode, f"http://127.0.0.1:{port}", process, log_path)


class ServiceFailed(Exception):
    """A service did not start or did not answer; the message says which and why."""


def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.read()


async def wait_until_ready(service: Service) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while True:
        if service.process.poll() is not None:
            log = service.log_path.read_text(errors="replace").strip()
            raise ServiceFailed(
                f"the {service.mode} service exited with status {service.process.returncode}:\n"
                f"{log}"
            )
        try:
            await asyncio.to_thread(_get, service.url + "/", 1.0)
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ServiceFailed(
                f"the {service.mode} service did not answer within {STARTUP_TIMEOUT_SECONDS:g} s "
                f"(log: {service.log_path})"
            )
        await asyncio.sleep(0.1)


async def fetch_profile(service: Service) -> bytes:
    try:
        return await asyncio.to_thread(
            # gc=1: a full collection first, so that garbage in cycles does not count as in use
            _get,
            service.url + "/debug/pprof/heap?gc=1",
            PROFILE_TIMEOUT_SECONDS,
        )
    except OSError as error:
        raise ServiceFailed(f"the {service.mode} service's heap profile failed: {error}") from error


def resident_bytes(pid: int) -> int | None:
    """The process's resident memory: what `process_resident_memory_bytes` reports on /metrics.

    Read from outside, so that measuring sends the leaky service no requests (each of which
    would leak too): from /proc, or from `ps` where there is no /proc. None if it is gone.
    """
    if os.path.isdir("/proc"):
        return _resident_bytes_from_proc(pid)
    return _resident_bytes_from_ps(pid)


def _resident_bytes_from_proc(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _resident_bytes_from_ps(pid: int) -> int | None:
    try:
        found = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        )
        return int(found.stdout.strip()) * 1024  # ps counts KiB
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
