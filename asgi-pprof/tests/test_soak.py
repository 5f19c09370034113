"""A soak: 1,000 heap windows against a real server under load, resident memory before and after.

Windows overlap, 50 at a time, as a team of people or scripts profiling one service would. With
the sampling profiler a window is two captures of its tables: 1,000 of them must cost under 5 MiB
(8 MiB on a free-threaded build, whose allocator, mimalloc, keeps pages per thread: 6.1 MB was
measured there at load average 8).
With tracemalloc each window traces while it lasts, and on Python 3.11 every tracing session
leaks the stacks it interned when it stops (CPython gh-121390, fixed in 3.12.5 and 3.13); that
cost is measured by benchmarks/window_memory.py and stated in the README, not asserted away here.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from server import serving

WINDOWS = 1000
AT_A_TIME = 50
MAX_GROWTH_BYTES = (8 if sysconfig.get_config_var("Py_GIL_DISABLED") else 5) * 2**20


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def window(url: str) -> int:
    with urllib.request.urlopen(url + "/debug/pprof/heap?seconds=1", timeout=120) as answer:
        answer.read()
        return answer.status


def test_a_thousand_sampled_windows_under_load_stay_within_their_memory_bound(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    hey = require_tool("hey")
    env = {"EXAMPLE_HEAP_PROFILER": "sampling"}
    with serving("example_service:app", tmp_path, env=env) as server:
        load = subprocess.Popen(
            [hey, "-z", "600s", "-c", "2", "-q", "10", server.url + "/"],
            stdout=subprocess.DEVNULL,
        )
        try:
            with concurrent.futures.ThreadPoolExecutor(AT_A_TIME) as pool:
                # A first round warms up what every window builds once (caches, threads).
                assert set(pool.map(window, [server.url] * AT_A_TIME)) == {200}
                before = resident_bytes(server.process.pid)
                started = time.monotonic()
                statuses = list(pool.map(window, [server.url] * WINDOWS))
                seconds = time.monotonic() - started
            after = resident_bytes(server.process.pid)
        finally:
            load.kill()
            load.wait()
    assert statuses == [200] * WINDOWS
    growth = after - before
    print(
        f"{WINDOWS} windows, {AT_A_TIME} at a time, in {seconds:.0f} s: RSS {before / 2**20:.1f}"
        f" -> {after / 2**20:.1f} MiB ({growth / 2**10:+.0f} KiB)"
    )
    assert growth < MAX_GROWTH_BYTES
