"""What on-demand heap windows cost in resident memory, one after the other, per heap profiler.

Two fixed-mode services side by side, one profiled with tracemalloc windows (PPROF_TRACEMALLOC=
on-demand: each `heap?seconds=1` starts tracing and stops it), one with the sampling profiler;
both under the same light load (hey, 20 requests/s each). Windows alternate between them; the
services' RSS is read from /proc before and after.

On Python 3.11 every tracemalloc start/stop leaks the tracebacks it interned (CPython gh-121390,
fixed in 3.12.5 and 3.13): the tracemalloc figure is that leak.

    PYTHONPATH=. .venv/bin/python benchmarks/window_memory.py --windows 100
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from tests.service import running_service

PROFILERS = {
    "tracemalloc": {"PPROF_HEAP_PROFILER": "tracemalloc", "PPROF_TRACEMALLOC": "on-demand"},
    "sampling": {"PPROF_HEAP_PROFILER": "sampling"},
}


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=100, help="windows per profiler")
    args = parser.parse_args()
    hey = shutil.which("hey")
    if hey is None:
        sys.exit("needs hey (Debian package hey)")
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        services = {
            name: stack.enter_context(running_service({"LEAK_MODE": "fixed", **env}, tmp))
            for name, env in PROFILERS.items()
        }
        loads = [
            subprocess.Popen(
                [hey, "-z", "3600s", "-c", "1", "-q", "20", s.url + "/"], stdout=subprocess.DEVNULL
            )
            for s in services.values()
        ]
        try:
            for service in services.values():  # a first window warms up what each builds once
                urllib.request.urlopen(service.url + "/debug/pprof/heap?seconds=1").read()
            before = {name: resident_bytes(s.process.pid) for name, s in services.items()}
            started = time.monotonic()
            for _ in range(args.windows):
                for service in services.values():
                    with urllib.request.urlopen(
                        service.url + "/debug/pprof/heap?seconds=1", timeout=120
                    ) as answer:
                        answer.read()
            after = {name: resident_bytes(s.process.pid) for name, s in services.items()}
        finally:
            for load in loads:
                load.kill()
    print(f"{args.windows} windows per profiler, one after the other, in "
          f"{time.monotonic() - started:.0f} s, under 20 requests/s each")  # fmt: skip
    print(f"{'profiler':<12} {'RSS before':>11} {'RSS after':>11} {'per window':>11}")
    for name in PROFILERS:
        growth = after[name] - before[name]
        print(
            f"{name:<12} {before[name] / 2**20:9.1f} MiB {after[name] / 2**20:7.1f} MiB "
            f"{growth / args.windows / 1024:8.1f} KiB"
        )


if __name__ == "__main__":
    main()
