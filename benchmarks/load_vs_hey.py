"""Our load generator against `hey`, side by side on the same service: req/s and their ratio.

    PYTHONPATH=. .venv/bin/python benchmarks/load_vs_hey.py [--requests N] [--rounds R]

For each LEAK_MODE the service is started once (tracemalloc off, no trace export), warmed up, and
then `hey -c 100 -n N` and `leaker load --concurrency 100 --requests N` take turns, each in a
process of its own, for R rounds; the order flips every round so neither client always meets the
warmer (or, in leaky mode, the less bloated) service. Server and client share the machine's cores,
the same for both clients. The target is a median ratio ours/hey of at least 0.80 (the median of
the rounds' ratios); the script exits 1 if a mode misses it. The last column shows how long the
service waited for a CPU: when other processes keep the cores busy, the figures are noisy.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.service import ROOT, running_service

CONCURRENCY = 100
TARGET_RATIO = 0.80
WARM_UP_REQUESTS = 2_000
MODES = ("fixed", "leaky")


class RunQueueWait:
    """Share of a run's wall time the service spent ready to run but waiting for a CPU.

    Read from Linux's /proc/PID/schedstat. Near 0 the two clients were compared fairly; a high
    share means other processes were taking the cores, and the figures are noisy.
    """

    def __init__(self, pid: int) -> None:
        self.path = Path(f"/proc/{pid}/schedstat")

    def __enter__(self) -> RunQueueWait:
        self.started = time.monotonic()
        self.waited_before = self._waited_ns()
        self.share = 0.0
        return self

    def __exit__(self, *exc_info: object) -> None:
        waited_seconds = (self._waited_ns() - self.waited_before) / 1e9
        self.share = waited_seconds / (time.monotonic() - self.started)

    def _waited_ns(self) -> int:
        return int(self.path.read_text().split()[1])


def hey_requests_per_second(hey: str, url: str, requests: int) -> float:
    output = run([hey, "-c", str(CONCURRENCY), "-n", str(requests), url])
    statuses = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", output))
    if statuses != {"200": str(requests)}:
        sys.exit(f"hey did not get {requests} OK responses: {statuses or output}")
    return float(_field(r"Requests/sec:\s+([\d.]+)", output))


def leaker_requests_per_second(url: str, requests: int) -> float:
    command = [sys.executable, "-m", "app.cli", "load", "--url", url]
    output = run([*command, "--concurrency", str(CONCURRENCY), "--requests", str(requests)])
    if _field(r"^statuses:\s+(.*)$", output) != f"200: {requests}":
        sys.exit(f"leaker load did not get {requests} OK responses:\n{output}")
    return float(_field(r"^req/s:\s+([\d.]+)", output))


def run(command: list[str]) -> str:
    # Each client in a session of its own, as when it is started from another terminal. Linux's
    # autogroup scheduling shares one CPU allowance among a session's processes: a client in the
    # service's session would draw on the service's allowance, and unequally for the
    # single-threaded leaker and the multi-threaded hey whenever other processes load the cores.
    finished = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=900, start_new_session=True
    )
    if finished.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({finished.returncode}):\n{finished.stderr}")
    return finished.stdout


def _field(pattern: str, output: str) -> str:
    match = re.search(pattern, output, re.MULTILINE)
    if match is None:
        sys.exit(f"no {pattern!r} in:\n{output}")
    return match.group(1)


def measure_mode(mode: str, hey: str, requests: int, rounds: int, log_dir: Path) -> float:
    """Print one mode's table; return the median of the rounds' ratios, ours/hey."""
    env = {
        "LEAK_MODE": mode,
        "OTEL_TRACES_EXPORTER": "none",
        "PPROF_ENABLED": "true",
        "PPROF_TRACEMALLOC": "on-demand",  # profiling stays off: its cost is not what we measure
    }
    clients: dict[str, Callable[[str], float]] = {
        "hey": lambda url: hey_requests_per_second(hey, url, requests),
        "ours": lambda url: leaker_requests_per_second(url, requests),
    }
    results: dict[str, list[float]] = {"hey": [], "ours": []}
    waits: dict[str, list[float]] = {"hey": [], "ours": []}
    print(f"\nLEAK_MODE={mode}: {CONCURRENCY} connections, {requests} requests per run", flush=True)
    with running_service(env, log_dir) as service:
        url = service.url + "/"
        hey_requests_per_second(hey, url, WARM_UP_REQUESTS)
        leaker_requests_per_second(url, WARM_UP_REQUESTS)
        print(
            f"{'round':>6} {'hey req/s':>11} {'ours req/s':>11} {'ours/hey':>9}"
            "   service waiting for a CPU (hey, ours)",
            flush=True,
        )
        for round_number in range(1, rounds + 1):
            order = ["hey", "ours"] if round_number % 2 else ["ours", "hey"]
            for name in order:
                with RunQueueWait(service.process.pid) as wait:
                    results[name].append(clients[name](url))
                waits[name].append(wait.share)
            waited = f"{waits['hey'][-1]:>6.0%}, {waits['ours'][-1]:>4.0%}"
            print_row(str(round_number), results["hey"][-1], results["ours"][-1], waited)
    ratios = [ours / hey for hey, ours in zip(results["hey"], results["ours"], strict=True)]
    hey_median = statistics.median(results["hey"])
    our_median = statistics.median(results["ours"])
    print_row("median", hey_median, our_median)
    # Each round's two runs are next to each other in time, so their ratio is the least disturbed
    # by whatever else the machine was doing; the median of those ratios is the verdict.
    median_ratio = statistics.median(ratios)
    print(f"median of the rounds' ratios: {median_ratio:.2f}", flush=True)
    return median_ratio


def print_row(label: str, hey_rate: float, our_rate: float, note: str = "") -> None:
    row = f"{label:>6} {hey_rate:>11.1f} {our_rate:>11.1f} {our_rate / hey_rate:>9.2f}   {note}"
    print(row.rstrip(), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=5_000, help="per run (default: %(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="runs of each client (default: 7)")
    args = parser.parse_args()
    if args.requests < CONCURRENCY or args.requests % CONCURRENCY:
        parser.error(f"--requests must be a multiple of {CONCURRENCY} (hey -n rounds down to one)")
    hey = shutil.which("hey")
    if hey is None:
        sys.exit("hey is not installed (apt-get install hey)")

    with tempfile.TemporaryDirectory() as log_dir:
        ratios = {
            mode: measure_mode(mode, hey, args.requests, args.rounds, Path(log_dir))
            for mode in MODES
        }

    print()
    missed = [mode for mode, ratio in ratios.items() if ratio < TARGET_RATIO]
    for mode, ratio in ratios.items():
        verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
        print(f"LEAK_MODE={mode}: ours/hey = {ratio:.2f} (target >= {TARGET_RATIO:.2f}: {verdict})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
