"""What a tracemalloc heap profile says about the service, though a forked child builds it: the
debug=1 footer's resident memory, and how long a `seconds=N` window really was."""

from __future__ import annotations

import asyncio
import mmap
import os
import re
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from asgi_pprof import PprofApp, heap

from pprof_decode import decode

MAPPED_BYTES = 64 * 2**20


def get(app: PprofApp, path: str) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://leaker") as client:
            return await client.get(path, timeout=60)

    return asyncio.run(send())


@pytest.fixture
def tracing() -> Iterator[None]:
    assert not tracemalloc.is_tracing(), "another test left tracemalloc on"
    tracemalloc.start(1)
    yield
    tracemalloc.stop()


@pytest.mark.usefixtures("tracing")
def test_the_footers_rss_is_the_services_not_the_forked_childs(tmp_path: Path) -> None:
    # Pages of a shared file mapping that the service has read count in its RSS; fork() does not
    # copy their page-table entries, so a child that read its own RSS would miss all of them.
    path = tmp_path / "mapped"
    path.write_bytes(b"\x01" * MAPPED_BYTES)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert sum(mapped[i] for i in range(0, MAPPED_BYTES, mmap.PAGESIZE)) > 0  # touch them
        before = heap.resident_bytes(os.getpid())
        answer = get(PprofApp(), "/heap?debug=1")
        after = heap.resident_bytes(os.getpid())
    assert answer.status_code == 200, answer.text
    found = re.search(r"^# RSS = (\d+)$", answer.text, re.MULTILINE)
    assert found is not None, answer.text[-500:]
    assert before is not None and after is not None
    reported = int(found.group(1))
    slack = MAPPED_BYTES / 4
    assert min(before, after) - slack <= reported <= max(before, after) + slack


@pytest.mark.usefixtures("tracing")
def test_a_window_lasts_its_seconds_however_long_its_captures_take(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Reading a large heap takes seconds: the window must not count them, at either end.
    real_get_traces = tracemalloc._get_traces

    def slow_get_traces() -> object:
        traces = real_get_traces()
        time.sleep(0.8)
        return traces

    monkeypatch.setattr(tracemalloc, "_get_traces", slow_get_traces)  # the child inherits it
    answer = get(PprofApp(), "/heap?seconds=1")
    assert answer.status_code == 200, answer.text
    duration = decode(answer.content).duration_nanos
    assert 1e9 <= duration < 1.5e9  # was 1.8 s: the start's capture, then a full second more
