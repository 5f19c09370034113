"""A real Prometheus, with the project's own scrape config, sees leaky mode's memory climb.

Both modes run at once, scraped by one Prometheus whose config is prometheus/prometheus.yml with
the `leaker` job's target pointed at the two local services. Each mode is then loaded in turn,
and its resident memory is read back through Prometheus's query API, as the workshop's graph
reads it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

from app.load import run_load
from tests.service import ROOT, free_port, running_service

PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"
MODES = ("leaky", "fixed")
WARMUP_REQUESTS = 1000
REQUESTS = 10_000
# Leaky mode keeps ~1,100 bytes of RSS per request: ~11 MB over REQUESTS.
MIN_LEAKY_RISE_BYTES = 5 * 2**20
# Fixed mode's RSS moves by a few hundred KB at most; a quarter of leaky's rise is far above that.
MAX_FIXED_SHARE_OF_LEAKY_RISE = 0.25
STARTUP_TIMEOUT_SECONDS = 60.0
SAMPLE_TIMEOUT_SECONDS = 30.0  # the config scrapes every 2 s


def scrape_config_for(targets: dict[str, str]) -> dict[str, Any]:
    """The project's Prometheus config, its `leaker` job scraping `targets` (mode -> host:port)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "leaker"]
    job["static_configs"] = [
        {"targets": [address], "labels": {"mode": mode}} for mode, address in targets.items()
    ]
    return config


@contextmanager
def running_prometheus(prometheus: str, config: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    """Start Prometheus on a free loopback port; yield its URL once it is ready."""
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: is_ready(url), STARTUP_TIMEOUT_SECONDS, "Prometheus to be ready")
        yield url
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query through Prometheus's HTTP API; returns the vector's samples."""
    address = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(address, timeout=10) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    return body["data"]["result"]


def resident_memory_scraped_after(url: str, mode: str, after: float) -> float:
    """`process_resident_memory_bytes` of `mode` from the first scrape that began after `after`."""
    selector = f'process_resident_memory_bytes{{job="leaker",mode="{mode}"}}'
    promql = f"{selector} and timestamp({selector}) > {after:.3f}"
    samples: list[dict[str, Any]] = []

    def scraped() -> bool:
        samples[:] = query(url, promql)
        return bool(samples)

    wait_until(scraped, SAMPLE_TIMEOUT_SECONDS, f"a scrape of {mode} after {after:.3f}")
    return float(samples[0]["value"][1])


def up_by_mode(url: str) -> dict[str, str]:
    return {
        sample["metric"]["mode"]: sample["value"][1] for sample in query(url, 'up{job="leaker"}')
    }


def load(service_url: str, requests: int) -> None:
    result = asyncio.run(run_load(service_url + "/", concurrency=50, requests=requests))
    assert result.errors == 0, result.summary()
    assert result.requests == requests


def test_prometheus_sees_leaky_memory_climb_and_fixed_memory_stay_flat(
    require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    prometheus = require_tool("prometheus")
    rises: dict[str, float] = {}
    with ExitStack() as stack:
        services = {
            mode: stack.enter_context(running_service({"LEAK_MODE": mode}, tmp_path))
            for mode in MODES
        }
        targets = {mode: service.url.removeprefix("http://") for mode, service in services.items()}
        url = stack.enter_context(
            running_prometheus(prometheus, scrape_config_for(targets), tmp_path)
        )
        wait_until(lambda: len(up_by_mode(url)) == len(MODES), 30, "both targets to be scraped")
        assert up_by_mode(url) == {mode: "1" for mode in MODES}

        for mode, service in services.items():
            load(service.url, WARMUP_REQUESTS)
            before = resident_memory_scraped_after(url, mode, time.time())
            started = time.monotonic()
            load(service.url, REQUESTS)
            seconds = time.monotonic() - started
            after = resident_memory_scraped_after(url, mode, time.time())
            rises[mode] = after - before
            print(
                f"{mode}: RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB over {REQUESTS} "
                f"requests ({rises[mode] / REQUESTS:.0f} bytes/request, {REQUESTS / seconds:.0f} "
                "req/s), as Prometheus scraped it"
            )
        assert up_by_mode(url) == {mode: "1" for mode in MODES}

    assert rises["leaky"] > MIN_LEAKY_RISE_BYTES
    assert rises["fixed"] < MAX_FIXED_SHARE_OF_LEAKY_RISE * rises["leaky"]
