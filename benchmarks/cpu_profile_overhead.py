"""What a CPU profile costs the service: throughput with and without `profile?seconds=12` running.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_profile_overhead.py [--rounds R] [--seconds S]

The fixed-mode service (no trace export, tracemalloc off) is started once and warmed up. Then, for
R rounds, `hey -c 50 -z Ss` runs twice: once alone, once while a CPU profile at the default rate
(100 Hz) covers the whole run; the order flips every round so that neither meets the warmer
service. The target is a median req/s ratio profiled/plain of at least 0.95 (at most 5% lost);
the script exits 1 if it is missed.

Each run also reports the service's CPU time per request (from /proc), and each profiled run the
CPU time its samples add up to and the CPU time the sampling handler itself used, as the profile
reports it in a comment: a cost that other processes on the machine do not blur, unlike req/s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.pprof_decode import decode, samples
from tests.service import Service, running_service

CONCURRENCY = 50
TARGET_RATIO = 0.95
PROFILE_MARGIN_SECONDS = 2  # the profile starts before hey and ends after it


@dataclass
class Run:
    requests_per_second: float
    cpu_ms_per_1000_requests: float
    profiled_cpu_seconds: float = 0.0  # what the profile's samples add up to
    handler_cpu_seconds: float = 0.0  # the profiler's own signal handler, as it reports it


def service_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process, all threads, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_hey(hey: str, service: Service, seconds: int) -> Run:
    started_cpu = service_cpu_seconds(service.process.pid)
    output = subprocess.run(
        [hey, "-c", str(CONCURRENCY), "-z", f"{seconds}s", service.url + "/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    used_cpu = service_cpu_seconds(service.process.pid) - started_cpu
    statuses = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", output))
    if set(statuses) != {"200"}:
        sys.exit(f"hey got answers other than 200: {statuses}\n{output}")
    requests = int(statuses["200"])
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])
    return Run(rate, used_cpu / requests * 1e6)


def run_hey_while_profiling(hey: str, service: Service, seconds: int) -> Run:
    profile_seconds = seconds + PROFILE_MARGIN_SECONDS
    answers: list[bytes] = []
    url = f"{service.url}/debug/pprof/profile?seconds={profile_seconds}"

    def fetch() -> None:
        with urllib.request.urlopen(url, timeout=profile_seconds + 60) as answer:
            answers.append(answer.read())

    fetching = threading.Thread(target=fetch)
    fetching.start()
    time.sleep(PROFILE_MARGIN_SECONDS / 2)
    run = run_hey(hey, service, seconds)
    fetching.join()
    if not answers:
        sys.exit("the profile request failed")
    profile = decode(answers[0])
    run.profiled_cpu_seconds = sum(s.values["cpu"] for s in samples(profile)) / 1e9
    comments = [profile.string_table[index] for index in profile.comment]
    handler_ms = next(re.search(r"in ([\d.]+) ms", c)[1] for c in comments if "sampling" in c)
    run.handler_cpu_seconds = float(handler_ms) / 1e3
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=10, help="each hey run")
    arguments = parser.parse_args()
    hey = shutil.which("hey")
    if hey is None:
        sys.exit("hey is not installed")

    env = {"LEAK_MODE": "fixed", "OTEL_TRACES_EXPORTER": "none", "PPROF_TRACEMALLOC": "on-demand"}
    ratios = []
    handler_shares = []  # the handler's CPU time over all the CPU time the profile saw
    with tempfile.TemporaryDirectory() as tmp, running_service(env, Path(tmp)) as service:
        subprocess.run(
            [hey, "-c", str(CONCURRENCY), "-n", "3000", service.url + "/"],
            capture_output=True, check=True,
        )  # fmt: skip
        print(f"hey -c {CONCURRENCY} -z {arguments.seconds}s against the fixed-mode service; "
              f"profiled runs under profile?seconds={arguments.seconds + PROFILE_MARGIN_SECONDS} "
              f"at {100} Hz")  # fmt: skip
        print(
            f"{'round':>5}  {'plain req/s':>11}  {'profiled req/s':>14}  {'ratio':>6}  "
            f"{'CPU ms/1000 req plain':>21}  {'profiled':>8}  {'profile saw':>11}  "
            f"{'in handler':>10}"
        )
        for round_number in range(1, arguments.rounds + 1):
            if round_number % 2:
                plain = run_hey(hey, service, arguments.seconds)
                profiled = run_hey_while_profiling(hey, service, arguments.seconds)
            else:
                profiled = run_hey_while_profiling(hey, service, arguments.seconds)
                plain = run_hey(hey, service, arguments.seconds)
            ratio = profiled.requests_per_second / plain.requests_per_second
            ratios.append(ratio)
            print(
                f"{round_number:>5}  {plain.requests_per_second:>11.1f}  "
                f"{profiled.requests_per_second:>14.1f}  {ratio:>6.3f}  "
                f"{plain.cpu_ms_per_1000_requests:>21.1f}  "
                f"{profiled.cpu_ms_per_1000_requests:>8.1f}  "
                f"{profiled.profiled_cpu_seconds:>10.2f}s  "
                f"{profiled.handler_cpu_seconds * 1e3:>7.1f} ms",
                flush=True,
            )
            handler_shares.append(profiled.handler_cpu_seconds / profiled.profiled_cpu_seconds)
    median = statistics.median(ratios)
    print(f"median ratio profiled/plain: {median:.3f} ({(1 - median) * 100:.1f}% lost); "
          f"target at least {TARGET_RATIO}")  # fmt: skip
    print(f"the sampling handler used {statistics.median(handler_shares) * 100:.2f}% of the "
          "service's CPU time (median over the profiled runs)")  # fmt: skip
    if median < TARGET_RATIO:
        sys.exit(1)


if __name__ == "__main__":
    main()
