"""Resident memory per request, leaky vs fixed, side by side: the leak as the kernel sees it.

    PYTHONPATH=. .venv/bin/python benchmarks/rss_growth.py [--requests 10000]

Both services run at once (tracemalloc off, no trace export). Each gets a warm-up, then N requests
from `leaker load` at concurrency 100; RSS is read from `process_resident_memory_bytes` on
/metrics before and after, and the growth is divided by N.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from tests.service import ROOT, running_service

WARM_UP_REQUESTS = 2_000


def resident_bytes(url: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    return int(float(re.search(r"^process_resident_memory_bytes (\S+)$", metrics, re.M)[1]))


def load(url: str, requests: int) -> str:
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "load",
        "--url",
        url + "/",
        "--concurrency",
        "100",
        "--requests",
        str(requests),
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    args = parser.parse_args()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        env = {"OTEL_TRACES_EXPORTER": "none", "PPROF_TRACEMALLOC": "on-demand"}
        services = {
            mode: stack.enter_context(running_service({**env, "LEAK_MODE": mode}, tmp))
            for mode in ("leaky", "fixed")
        }
        print("| mode | RSS before | RSS after | growth per request | req/s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for mode, service in services.items():
            load(service.url, WARM_UP_REQUESTS)
            before = resident_bytes(service.url)
            summary = load(service.url, args.requests)
            after = resident_bytes(service.url)
            rate = re.search(r"req/s:\s+([\d.]+)", summary)
            rate_text = rate[1] if rate else "?"
            print(
                f"| {mode} | {before / 2**20:.1f} MiB | {after / 2**20:.1f} MiB | "
                f"{(after - before) / args.requests:,.0f} B | {rate_text} |"
            )


if __name__ == "__main__":
    main()
