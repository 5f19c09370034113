"""uvicorn with uvloop and httptools (its `standard` extras, just those two) against its
pure-Python event loop and HTTP parser: requests/s of the fixed-mode service, both at once.

    PYTHONPATH=. .venv/bin/python benchmarks/uvicorn_speedups.py [--seconds 5] [--rounds 5]

They are not in the lock: with them installed, tests/test_heap_profile.py's
test_pprof_reads_the_legacy_text_without_rescaling fails (a traced 0-byte block appears, which
pprof drops). To measure, install them into .venv first (`make venv` leaves them there):

    .venv/bin/pip install uvloop==0.23.0 httptools==0.9.0

Both services run from the same venv, with `--loop`/`--http` chosen explicitly, no trace export
and pprof idle, as in service_throughput.py. `hey -c 50 -z Ns` drives one, then the other,
round after round, so that the machine's noise falls on both alike; the figure is the median of
the per-round ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from tests.service import running_service

CONFIGURATIONS: dict[str, list[str]] = {
    "asyncio + h11 (pure Python)": ["--loop", "asyncio", "--http", "h11"],
    "uvloop + httptools": ["--loop", "uvloop", "--http", "httptools"],
}
MODES = ("fixed", "leaky")


def hey(url: str, seconds: float) -> float:
    output = subprocess.run(
        ["hey", "-c", "50", "-z", f"{seconds}s", url], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not match:
        raise RuntimeError(f"no req/s in hey's output:\n{output}")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("hey is needed: apt-get install hey")
    if importlib.util.find_spec("uvloop") is None or importlib.util.find_spec("httptools") is None:
        print("not run: .venv/bin/pip install uvloop==0.23.0 httptools==0.9.0 first (see above)")
        return 0

    keys = [(mode, name) for mode in MODES for name in CONFIGURATIONS]
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for mode in MODES:
            services = {
                name: stack.enter_context(
                    running_service({"LEAK_MODE": mode}, tmp, uvicorn_options=options)
                )
                for name, options in CONFIGURATIONS.items()
            }
            for service in services.values():
                hey(service.url + "/", 1.0)  # warm-up
            for round_number in range(args.rounds):
                for name, service in services.items():
                    rates[mode, name].append(hey(service.url + "/", args.seconds))
                    rate = rates[mode, name][-1]
                    print(f"{mode} round {round_number + 1}: {name}: {rate:.0f} req/s", flush=True)

    print()
    print("| mode | loop and parser | req/s (median) | rounds |")
    print("| --- | --- | ---: | --- |")
    for mode, name in keys:
        values = rates[mode, name]
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {mode} | {name} | {statistics.median(values):.0f} | {shown} |")
    slow, fast = CONFIGURATIONS
    for mode in MODES:
        ratios = [f / s for f, s in zip(rates[mode, fast], rates[mode, slow], strict=True)]
        print(
            f"{mode}: uvloop + httptools / pure Python = {statistics.median(ratios):.2f} "
            f"(rounds {min(ratios):.2f} to {max(ratios):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
