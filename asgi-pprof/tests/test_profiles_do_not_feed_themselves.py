"""The profiler's own answers are not the service's memory: fetching `heap?debug=1` a thousand
times (each a text of megabytes, of a new size, built and sent by the server) neither adds a record
per fetch nor grows the process. Before, each text was sampled where the server's transport held
it, at its own size: one new record a fetch (17 records became 4,231 over 8,000 fetches), and the
fetches slowed tenfold. The server's own work for any request (accepting, parsing headers) still
adds the odd record as rarer paths get sampled: plain requests first make most of those.
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
# "in use: bytes [allocs: bytes] @ stack": a record's allocations, all of one size class.
RECORD = re.compile(r"^\d+: \d+ \[(\d+): (\d+)\] @ (.*)\n(# labels: .*)?", re.M)


def fetch_text(url: str) -> str:
    with urllib.request.urlopen(url + "/debug/pprof/heap?debug=1", timeout=60) as answer:
        return answer.read().decode()


def records_of(text: str) -> int:
    return int(RECORDS.findall(text)[-1])


def allocations(text: str) -> dict[tuple[str, str, int], int]:
    """Each record's allocations, by stack, labels and size (a record's bytes over its count)."""
    return {
        (stack, labels, int(size) // int(count)): int(count)
        for count, size, stack, labels in RECORD.findall(text)
    }


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_a_thousand_debug_texts_add_no_record_a_fetch_and_no_memory(tmp_path: Path) -> None:
    # At 64 KiB, a text of a megabyte allocated where the sampler looks is sampled for sure.
    env = {"EXAMPLE_HEAP_PROFILER": "sampling", "PPROF_MEM_PROFILE_RATE": "65536"}
    with serving("example_service:app", tmp_path, env=env) as server:
        for _ in range(2000):
            urllib.request.urlopen(server.url + "/debug/pprof/cmdline", timeout=60).close()
        for _ in range(50):  # the first fetches build what every fetch reuses
            text = fetch_text(server.url)
        records_before, allocated_before = records_of(text), allocations(text)
        rss_before = resident_bytes(server.process.pid)
        records = []
        for _ in range(FETCHES):
            text = fetch_text(server.url)
            records.append(records_of(text))
        rss_after = resident_bytes(server.process.pid)
    # The allocations made during the fetches: records new since, or grown.
    grown = [
        (size, stack)
        for (stack, labels, size), count in allocations(text).items()
        if count > allocated_before.get((stack, labels, size), 0)
    ]
    largest, stack = max(grown)
    print(f"texts of {len(text) / 1e6:.1f} MB; records {records_before} -> {records[-1]}; "
          f"largest sampled allocation {largest} B; RSS {rss_before / 2**20:.1f} -> "
          f"{rss_after / 2**20:.1f} MiB")  # fmt: skip
    assert len(text) > 1_000_000
    # Neither a text nor what is left of one in the transport's buffer was sampled while they
    # were fetched (the largest allocation of the server's own is asyncio's 256 KiB read buffer).
    assert largest < 512 * 1024, f"{largest} B at {stack}"
    assert records[-1] - records_before < FETCHES // 5
    assert rss_after - rss_before < 8 * 2**20
