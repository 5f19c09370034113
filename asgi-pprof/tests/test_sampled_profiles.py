"""`heap` and `allocs` from the sampling heap profiler, as Go writes them and pprof reads them.

In-process: allocations whose stacks and sizes the test knows, the profiles built from them, the
endpoints through httpx, and the real `go tool pprof` on the files.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from asgi_pprof import PprofApp, sampled_profile, sampled_stacks, sampling
from asgi_pprof.sampling import Record, SampledHeap, scale_heap_sample

from go_pprof import run_pprof
from pprof_decode import decode, invariant_violations, samples
from sampler_helpers import allocate, require_sampler

require_sampler()

RATE = 4096
SIZE = 3000  # bytearray(SIZE) keeps SIZE + 1 bytes in a block of its own


@pytest.fixture(autouse=True)
def sampler_stopped() -> Iterator[None]:
    assert not tracemalloc.is_tracing(), "another test left tracemalloc on"
    sampling.stop()
    yield
    sampling.stop()


def allocate_kept(count: int) -> list[bytearray | None]:
    return allocate(count, SIZE)


def churn(count: int) -> None:
    for _ in range(count):
        bytearray(SIZE)


def sampled_heap() -> SampledHeap:
    sampling.start(rate=RATE)
    global kept
    kept = allocate_kept(2000)
    churn(2000)
    return sampling.capture()


kept: list[bytearray | None] = []


def get(url: str) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=PprofApp())
        async with httpx.AsyncClient(transport=transport, base_url="http://leaker") as client:
            return await client.get(url)

    return asyncio.run(send())


def values_at(profile: Any, leaf: str, caller: str = "") -> dict[str, int]:
    totals: dict[str, int] = {}
    for sample in samples(profile):
        functions = [frame.function for frame in sample.frames]
        if functions and functions[0].endswith(leaf) and (not caller or caller in functions):
            for name, value in sample.values.items():
                totals[name] = totals.get(name, 0) + value
    return totals


@pytest.mark.parametrize("name", ["heap", "allocs"])
def test_profiles_have_gos_sample_types_period_and_bytes_label(name: str) -> None:
    heap = sampled_heap()
    profile = decode(sampled_profile.build(heap, name))
    strings = profile.string_table
    assert invariant_violations(profile) == []
    assert [(strings[t.type], strings[t.unit]) for t in profile.sample_type] == (
        sampled_profile.SAMPLE_TYPES
    )
    default = {"heap": "inuse_space", "allocs": "alloc_space"}[name]
    assert strings[profile.default_sample_type] == default
    assert (strings[profile.period_type.type], strings[profile.period_type.unit]) == (
        "space",
        "bytes",
    )
    assert profile.period == RATE
    comments = [strings[index] for index in profile.comment]
    assert any("sampling heap profiler" in c and f"per {RATE} bytes" in c for c in comments)
    for sample in profile.sample:
        numbers = [(strings[label.key], label.num) for label in sample.label if label.num]
        assert len(numbers) == 1 and numbers[0][0] == "bytes" and numbers[0][1] > 0
        words = {strings[label.key]: strings[label.str] for label in sample.label if label.str}
        assert words.get("thread") == "MainThread"  # all of this test's blocks are its thread's
    # Each record's values are its sampled counts, unsampled as Go's scaleHeapSample does.
    block = SIZE + 1
    record = next(
        r for r in heap.records if r.size == block and r.stack[1].name.endswith("allocate_kept")
    )
    kept_values = values_at(profile, "allocate", "test_sampled_profiles.allocate_kept")
    assert [kept_values["alloc_objects"], kept_values["alloc_space"]] >= list(
        scale_heap_sample(record.allocs, record.allocs * block, RATE)
    )
    estimate = kept_values["inuse_space"]
    assert 0.5 * 2000 * block < estimate < 1.5 * 2000 * block
    churned = values_at(profile, "test_sampled_profiles.churn")
    assert churned["inuse_space"] < churned["alloc_space"] / 10  # freed as soon as made


LEGACY_HEADER = re.compile(r"heap profile: (\d+): (\d+) \[(\d+): (\d+)\] @ heap/(\d+)")
LEGACY_RECORD = re.compile(r"(\d+): (\d+) \[(\d+): (\d+)\] @((?: 0x[0-9a-f]+)+)")
LEGACY_FRAME = re.compile(r"#\t0x[0-9a-f]+\t[^\t]+\t[^\t]+:-?\d+")
LEGACY_LABELS = re.compile(r'# labels: \{"[^"]+":"[^"]*"(, "[^"]+":"[^"]*")*\}')


def test_legacy_text_is_gos_with_raw_counts() -> None:
    heap = sampled_heap()
    lines = sampled_profile.render_text(heap).splitlines()
    header = LEGACY_HEADER.fullmatch(lines[0])
    assert header, lines[0]
    assert int(header[5]) == 2 * RATE  # heap/<2*MemProfileRate>, as Go writes it
    records = []
    index = 1
    while LEGACY_RECORD.fullmatch(lines[index]):
        record = LEGACY_RECORD.fullmatch(lines[index])
        frames = lines[index + 1 : lines.index("", index)]
        if frames[0].startswith("# labels: "):  # as Go's goroutine profile prints labels
            assert LEGACY_LABELS.fullmatch(frames[0]), frames[0]
            frames = frames[1:]
            index += 1
        assert frames and all(LEGACY_FRAME.fullmatch(frame) for frame in frames), frames
        assert len(frames) == len(record[5].split())
        records.append([int(record[n]) for n in range(1, 5)])
        index += len(frames) + 2
    assert lines[index : index + 2] == ["", "# python.MemStats"]  # Go: "\n# runtime.MemStats"
    assert [int(header[n]) for n in range(1, 4)] == [sum(r[n] for r in records) for n in range(3)]
    assert int(header[4]) in (sum(r[3] for r in records), sum(r[3] for r in records) + 1)
    assert [r[1] for r in records] == sorted((r[1] for r in records), reverse=True)
    # Raw sampled counts: as many blocks as were sampled, whole blocks of one size each.
    assert sum(r[2] for r in records) == sum(r.allocs for r in heap.records)
    assert all(r[1] % r[0] == 0 for r in records if r[0])


def raw_totals(go: str, path: Path, *options: str) -> dict[str, int]:
    """The sum of each sample type over `go tool pprof -raw`'s samples."""
    output = run_pprof(go, "-raw", *options, str(path))
    lines = output.splitlines()
    types = [t.removesuffix("[dflt]") for t in lines[lines.index("Samples:") + 1].split()]
    totals = dict.fromkeys(types, 0)
    samples_text = output.split("Samples:", 1)[1].split("Locations", 1)[0]
    for match in re.finditer(r"^\s+(-?\d+(?:\s+-?\d+)*):", samples_text, re.M):
        for sample_type, value in zip(types, match[1].split(), strict=True):
            totals[sample_type] += int(value)
    return totals


def test_pprof_reads_the_text_and_the_binary_form_with_the_same_totals(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    heap = sampled_heap()
    binary = tmp_path / "heap.pb.gz"
    binary.write_bytes(sampled_profile.build(heap, "heap"))
    text = tmp_path / "heap.txt"
    text.write_text(sampled_profile.render_text(heap))
    from_binary, from_text = raw_totals(go, binary), raw_totals(go, text)
    print(from_binary, from_text)
    assert from_binary == from_text
    assert from_binary["inuse_space/bytes"] > 2000 * SIZE / 2
    for path in (binary, text):
        output = run_pprof(go, "-top", "-sample_index=alloc_space", str(path))
        assert "Type: alloc_space" in output


def test_pprof_reads_allocs_and_its_sample_indexes_and_bytes_tags(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    path = tmp_path / "allocs.pb.gz"
    path.write_bytes(sampled_profile.build(sampled_heap(), "allocs"))
    assert "Type: alloc_space" in run_pprof(go, "-top", str(path))
    assert "Type: inuse_space" in run_pprof(go, "-top", "-sample_index=inuse_space", str(path))
    # A number with its unit, as for Go's own profiles.
    focused = run_pprof(go, "-top", f"-tagfocus=bytes={SIZE + 1}B", str(path))
    assert "test_sampled_profiles.allocate_kept" in focused
    assert "test_sampled_profiles.churn" in focused
    tags = run_pprof(go, "-tags", str(path))
    assert "bytes:" in tags and "2.93kB" in tags  # SIZE + 1 bytes, as pprof prints it


def test_the_growth_is_the_profile_at_the_end_minus_the_one_at_the_start() -> None:
    sampling.start(rate=RATE)
    before = sampling.capture()
    global kept
    kept = allocate_kept(1000)
    after = sampling.capture()
    growth = sampled_profile.delta(
        sampled_profile.unsampled(after), sampled_profile.unsampled(before)
    )
    end, start = sampled_profile.unsampled(after), sampled_profile.unsampled(before)
    zero = [0, 0, 0, 0]
    for key, values in growth.values.items():
        pairs = zip(end.values.get(key, zero), start.values.get(key, zero), strict=True)
        assert values == [e - s for e, s in pairs]
        assert any(values)
    assert growth.duration_ns == after.time_ns - before.time_ns > 0
    grown = [
        values for key, values in growth.values.items()
        if growth.records[key].size == SIZE + 1
        and growth.records[key].stack[1].name.endswith("allocate_kept")
    ]  # fmt: skip
    assert grown and grown[0][3] > 0


def test_endpoints_answer_from_the_sampler_at_once() -> None:
    sampled_heap()
    index = get("/")
    assert index.status_code == 200
    assert "<a href='allocs?debug=1'>allocs</a>" in index.text
    assert f"one allocation sampled per {RATE} bytes" in index.text
    started = time.monotonic()
    for name in ("heap", "allocs"):
        answer = get(f"/{name}")
        assert answer.status_code == 200
        profile = decode(answer.content)
        assert profile.period == RATE
        assert f'filename="{name}"' in answer.headers["content-disposition"]
        assert (
            values_at(profile, "allocate", "test_sampled_profiles.allocate_kept")["inuse_space"] > 0
        )
        text = get(f"/{name}?debug=1&gc=1")
        assert LEGACY_HEADER.match(text.text)
    assert time.monotonic() - started < 10  # no window, no fork: at once
    bad = get("/heap?seconds=1&debug=1")
    assert (bad.status_code, bad.text.strip()) == (400, "seconds and debug params are incompatible")
    assert get("/allocs?seconds=0").status_code == 400


def test_a_window_answers_the_growth_while_it_lasts() -> None:
    sampling.start(rate=RATE)

    def allocate_later() -> None:
        time.sleep(0.3)
        global kept
        kept = allocate_kept(1000)

    thread = threading.Thread(target=allocate_later)
    thread.start()
    answer = get("/heap?seconds=1&gc=1")
    thread.join()
    assert answer.status_code == 200
    assert 'filename="heap-delta"' in answer.headers["content-disposition"]
    profile = decode(answer.content)
    assert profile.duration_nanos >= 1e9
    assert values_at(profile, "allocate", "test_sampled_profiles.allocate_kept")["inuse_space"] > 0


def test_without_the_sampler_allocs_is_unknown_and_heap_is_tracemalloc() -> None:
    assert not sampling.is_running()
    answer = get("/allocs")
    assert (answer.status_code, answer.text.strip()) == (404, "Unknown profile")
    index = get("/")
    assert "allocs" not in index.text
    assert "from tracemalloc" in index.text


def test_where_the_extension_is_missing_start_says_why_and_tracemalloc_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sampling, "_memprof", None)
    monkeypatch.setattr(sampling, "_UNAVAILABLE_REASON", "the sampling heap profiler is not built")
    with pytest.raises(sampling.SamplingUnavailable, match="not built"):
        sampling.start()
    assert not sampling.is_running()
    assert sampling.capture().records == []
    answer = get("/heap?seconds=1")
    assert answer.status_code == 200
    assert decode(answer.content).period == 1  # tracemalloc's: exact, not sampled
    assert get("/allocs").status_code == 404


def test_a_record_without_python_frames_is_shown_under_a_frame_that_says_so() -> None:
    """An allocation made where no Python frame runs (a thread starting, a C library's thread
    without the GIL) is not dropped: it is one frame that names what it stands for."""
    stack = sampled_stacks.pseudo_stack(sampled_stacks.NO_GIL)
    record = Record(stack, 3, sampling.size_class(64), 0, 0, 3, 1, 192, 64)
    heap = SampledHeap([record], RATE, 64)
    profile = decode(sampled_profile.build(heap, "heap"))
    assert invariant_violations(profile) == []
    (sample,) = samples(profile)
    assert [frame.function for frame in sample.frames] == ["asgi_pprof.sampler.without_the_gil"]
    assert list(profile.sample[0].value) == [
        *scale_heap_sample(3, 192, RATE),
        *scale_heap_sample(2, 128, RATE),
    ]


def test_a_profile_holds_only_the_locations_its_samples_use() -> None:
    """Locations and functions are written for the samples of this profile, none left over from
    stacks seen before (a profile's size follows its samples, not the sampler's history)."""
    heap = sampled_heap()
    profile = decode(sampled_profile.build(heap, "heap"))
    used = {location_id for sample in profile.sample for location_id in sample.location_id}
    assert {location.id for location in profile.location} == used
    used_functions = {line.function_id for location in profile.location for line in location.line}
    assert {function.id for function in profile.function} == used_functions
    one = SampledHeap([heap.records[0]], heap.rate, heap.frames, heap.stats)
    small = decode(sampled_profile.build(one, "heap"))
    assert len(small.location) == len({location.id for location in heap.records[0].stack})


def allocates_inside_and_outside_a_comprehension() -> list[bytearray]:
    blocks = [bytearray(7777) for _ in range(3)]  # 3.11: a <listcomp> code object of its own
    blocks.append(bytearray(7777))
    return blocks


def test_a_function_is_one_function_in_the_profile_whatever_its_code_objects() -> None:
    """On 3.11 a comprehension is a function of its own, named after the function around it (as
    3.12 inlines it): the profile holds one Function for both, as pprof expects."""
    sampling.start(rate=1)
    keep = allocates_inside_and_outside_a_comprehension()
    profile = decode(sampled_profile.build(sampling.capture(), "heap"))
    assert invariant_violations(profile) == []
    strings = profile.string_table
    named = [
        (strings[f.name], strings[f.filename], f.start_line)
        for f in profile.function
        if strings[f.name].endswith("allocates_inside_and_outside_a_comprehension")
    ]
    assert len(named) == 1
    del keep
