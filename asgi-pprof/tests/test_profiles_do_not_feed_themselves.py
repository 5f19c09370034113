"""The profiler's own answers are not the service's memory: fetching `heap?debug=1` a thousand
times (each a text of a new size, built, sent by the server) leaves the sampler's records and the
process's memory where they were. Before, each fetch's text was sampled where the server sent it,
one new record per size: 17 records became 4,231, and the fetches slowed tenfold.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from sampler_helpers import require_sampler
from server import serving

require_sampler()
FETCHES = 1000
RECORDS = re.compile(r"^# Records = (\d+)$", re.M)


def fetch_text(url: str) -> int:
    with urllib.request.urlopen(url + "/debug/pprof/heap?debug=1", timeout=60) as answer:
        return int(RECORDS.findall(answer.read().decode())[-1])


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_a_thousand_debug_texts_leave_the_records_and_the_memory_as_they_were(
    tmp_path: Path,
) -> None:
    # A rate that samples every text, each several kilobytes: a fetch's allocations are seen.
    env = {"EXAMPLE_HEAP_PROFILER": "sampling", "PPROF_MEM_PROFILE_RATE": "4096"}
    with serving("example_service:app", tmp_path, env=env) as server:
        for _ in range(50):  # the first fetches build what every fetch reuses
            records_before = fetch_text(server.url)
        rss_before = resident_bytes(server.process.pid)
        records = [fetch_text(server.url) for _ in range(FETCHES)]
        rss_after = resident_bytes(server.process.pid)
    print(f"records {records_before} -> {records[-1]} (at most {max(records)}); RSS "
          f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")  # fmt: skip
    assert max(records) <= records_before + 20
    assert rss_after - rss_before < 8 * 2**20
