"""Go's `heap` and `allocs` profiles from the sampler's records, written as Go writes them.

- profile.proto (runtime/pprof's writeHeapProto): sample types alloc_objects/count,
  alloc_space/bytes, inuse_objects/count, inuse_space/bytes; period type space/bytes, period the
  sampling rate; each record's counts unsampled by `scale_heap_sample` at its average block size,
  and a numeric label `bytes` with that size. `heap` defaults to inuse_space, `allocs` to
  alloc_space. A profile holds the locations and functions its samples use, no others.
- The legacy text (`debug=1`, pprof.go's writeHeapInternal): the raw sampled counts, and a header
  `heap profile: N: B [AN: AB] @ heap/<2*rate>` that tells pprof to unsample them itself (the 2 is
  a convention kept from the C++ heap profiler), so both forms read as the same totals.
- The growth over a window (`seconds=N`), as net/http/pprof's serveDeltaProfile computes it:
  the unsampled profile at the end minus the one at the start, samples that cancel dropped.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass, field

from asgi_pprof import labels, sampling
from asgi_pprof.profile import ProfileBuilder, encode_varints
from asgi_pprof.sampled_stacks import (
    FOLDED,
    PSEUDO_FUNCTIONS,
    TABLE_FULL,
    Function,
    Location,
)
from asgi_pprof.sampling import Record, SampledHeap, scale_heap_sample

SAMPLE_TYPES = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
]
DEFAULT_SAMPLE_TYPES = {"heap": "inuse_space", "allocs": "alloc_space"}

Key = tuple[int, int, int, int]  # Record.key


@dataclass
class SampledProfile:
    """Unsampled values by record: [alloc_objects, alloc_space, inuse_objects, inuse_space],
    as Go writes them into profile.proto."""

    values: dict[Key, list[int]]
    records: dict[Key, Record]  # each key's record: its stack, labels and block size
    rate: int
    frames: int
    time_ns: int
    duration_ns: int = 0  # 0: since start; else a window's growth
    comments: list[str] = field(default_factory=list)


def unsampled(heap: SampledHeap) -> SampledProfile:
    """What the samples stand for, record by record, as Go's writeHeapProto scales them."""
    values, records, rate = {}, {}, heap.rate
    for record in heap.records:
        key = record.key
        values[key] = [
            *scale_heap_sample(record.allocs, record.alloc_bytes, rate),
            *scale_heap_sample(record.allocs - record.frees, record.inuse_bytes, rate),
        ]
        records[key] = record
    return SampledProfile(values, records, rate, heap.frames, heap.time_ns, comments=_notes(heap))


def delta(end: SampledProfile, start: SampledProfile) -> SampledProfile:
    """`end` minus `start`, as Go's serveDeltaProfile merges p1 with p0 scaled by -1."""
    values = {key: list(v) for key, v in end.values.items()}
    for key, earlier in start.values.items():
        later = values.setdefault(key, [0, 0, 0, 0])
        for index, value in enumerate(earlier):
            later[index] -= value
    growth = {key: v for key, v in values.items() if any(v)}
    records = {key: end.records.get(key) or start.records[key] for key in growth}
    duration_ns = end.time_ns - start.time_ns
    comments = [
        *end.comments,
        "growth: the profile at the end minus the one at the start (Duration above)",
    ]
    return SampledProfile(
        growth, records, end.rate, end.frames, start.time_ns, duration_ns, comments
    )


def comments(rate: int, frames: int) -> list[str]:
    """What each profile says of its backend, and the index too."""
    return [
        f"sampling heap profiler: one allocation sampled per {rate} bytes allocated on average, "
        f"stacks up to {frames} frames; values unsampled as Go's runtime/pprof does"
    ]


def _notes(heap: SampledHeap) -> list[str]:
    """What the profile must say of records that are not what they seem."""
    notes = []
    folded = heap.stats.get("folded", 0)
    if folded:
        notes.append(
            f"{folded} records with no live block were folded into "
            f"{PSEUDO_FUNCTIONS[FOLDED]} to keep the sampler within "
            f"{heap.stats.get('max_bytes')} bytes (PPROF_MEM_PROFILE_MAX_BYTES)"
        )
    table_full = heap.stats.get("table_full", 0)
    if table_full:
        notes.append(
            f"the sampler's tables were full: {table_full} samples of new stacks are counted under "
            f"{PSEUDO_FUNCTIONS[TABLE_FULL]} (PPROF_MEM_PROFILE_MAX_BYTES raises the bound)"
        )
    dropped = heap.stats.get("dropped", 0)
    if dropped:
        notes.append(f"{dropped} sampled blocks could not be followed (no room): counted as freed")
    return notes


def labels_of(record: Record, thread_names: dict[int, str]) -> dict[str, str]:
    """The string labels of a record's samples: its label set's, and its thread's name."""
    pairs = labels.label_set(record.label)
    if record.thread:
        pairs["thread"] = thread_names[record.thread]
    return pairs


def encode(profile: SampledProfile, name: str) -> bytes:
    """The gzipped profile.proto of `heap` or `allocs` (which differ in their default type)."""
    default = DEFAULT_SAMPLE_TYPES[name]
    builder = ProfileBuilder(
        sample_types=SAMPLE_TYPES,
        default_sample_type=default,
        period_type=("space", "bytes"),
        period=profile.rate,
        time_nanos=profile.time_ns,
        duration_nanos=profile.duration_ns,
        comments=comments(profile.rate, profile.frames) + profile.comments,
        mapping_file="python" if not profile.duration_ns else "python (window growth)",
    )
    tables = sampling.sampled_stacks()
    column = [type_ for type_, _ in SAMPLE_TYPES].index(default)
    ordered = sorted(profile.values.items(), key=lambda item: item[1][column], reverse=True)
    used: dict[int, Location] = {}
    encoded_stacks: dict[int, bytes] = {}
    label_fields: dict[tuple[int, int, int], bytes] = {}  # by label set, thread, block size
    threads = sampling.thread_names({record.thread for record in profile.records.values()} - {0})
    for key, values in ordered:
        record = profile.records[key]
        location_ids = encoded_stacks.get(record.stack_id)
        if location_ids is None:
            if tables.stacks.get(record.stack_id) is record.stack:
                location_ids = tables.encoded_stack(record.stack_id)
            else:  # gone from the sampler since it was captured
                location_ids = encode_varints(location.id for location in record.stack)
            encoded_stacks[record.stack_id] = location_ids
            for location in record.stack:
                used[location.id] = location
        fields_key = (record.label, record.thread, record.size)
        fields = label_fields.get(fields_key)
        if fields is None:
            fields = label_fields[fields_key] = builder.label_fields(
                labels_of(record, threads), {"bytes": record.size}
            )
        builder.add_sample_packed(location_ids, encode_varints(values), fields)
    functions: dict[int, Function] = {}
    for location in used.values():
        builder.add_encoded_location(tables.encoded_location(location))
        functions[location.function.id] = location.function
    for function in functions.values():
        builder.add_function(function.id, function.name, function.filename, function.start_line)
    return builder.encode()


def build(heap: SampledHeap, name: str, start: SampledHeap | None = None) -> bytes:
    """The `heap` or `allocs` profile.proto of `heap`, or of its growth since `start`."""
    with sampling.collection_paused():
        profile = unsampled(heap)
        if start is not None:
            profile = delta(profile, unsampled(start))
        return encode(profile, name)


def index_entries(profiles: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The index's (name, count, description) with the sampler: allocs listed, heap described
    as sampled; the count is the number of records, as in Go."""
    stats = sampling.stats()
    records = str(stats["records"])
    backend = comments(int(stats["rate"]), int(stats["max_frames"]))[0]
    allocs = (
        "allocs",
        records,
        "A sampling of all past memory allocations (since the sampler started). Specify "
        f"seconds=N for the growth over N seconds. From the {backend}.",
    )
    heap = (
        "heap",
        records,
        "A sampling of memory allocations of live objects. Specify the gc GET parameter to run "
        f"GC before taking the heap sample, seconds=N for the growth. From the {backend}.",
    )
    return [allocs, *(heap if entry[0] == "heap" else entry for entry in profiles)]


def render_text(heap: SampledHeap) -> str:
    """Go's legacy text (`debug=1`) for `heap` and `allocs` alike: raw sampled counts."""
    with sampling.collection_paused():
        return _render_text(heap)


def _render_text(heap: SampledHeap) -> str:
    records = sorted(heap.records, key=lambda record: record.inuse_bytes, reverse=True)
    inuse_objects = sum(record.inuse for record in records)
    inuse_bytes = sum(record.inuse_bytes for record in records)
    alloc_objects = sum(record.allocs for record in records)
    alloc_bytes = sum(record.alloc_bytes for record in records)
    if inuse_bytes == alloc_bytes:
        alloc_bytes += 1  # as Go does: pprof would read equal columns as a 2-column profile
    lines = [
        f"heap profile: {inuse_objects}: {inuse_bytes} [{alloc_objects}: {alloc_bytes}] "
        f"@ heap/{2 * heap.rate}"
    ]
    tables = sampling.sampled_stacks()
    threads = sampling.thread_names({record.thread for record in records} - {0})
    for record in records:
        addresses, frames = tables.legacy_stack(record.stack_id, record.stack)
        head = f"{record.inuse}: {record.inuse_bytes} [{record.allocs}: {record.alloc_bytes}]"
        pairs = labels_of(record, threads)
        if pairs:  # as Go's goroutine profile prints them
            pairs_text = ", ".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs.items())
            frames = f"# labels: {{{pairs_text}}}\n{frames}"
        lines.append(f"{head} @ {addresses}\n{frames}\n")
    lines += ["", *_memory_statistics(heap)]
    return "\n".join(lines) + "\n"


def _memory_statistics(heap: SampledHeap) -> list[str]:
    """The footer: Python's counterpart of Go's `# runtime.MemStats`, numbers we measure."""
    stats = heap.stats
    lines = [
        "# python.MemStats",
        "# HeapProfiler = sampling",
        f"# MemProfileRate = {heap.rate}",
        f"# MaxFrames = {heap.frames}",
    ]
    for name in ("samples", "records", "stacks", "locations", "functions", "live_blocks"):
        title = "LiveSampledBlocks" if name == "live_blocks" else name.capitalize()
        lines.append(f"# {title} = {stats.get(name, 0)}")
    lines += [
        f"# FoldedRecords = {stats.get('folded', 0)}",
        f"# TableFullSamples = {stats.get('table_full', 0)}",
        f"# DroppedBlocks = {stats.get('dropped', 0)}",
        f"# ProfilerOwnBytes = {stats.get('own_bytes', 0)}",
        f"# ProfilerMaxBytes = {stats.get('max_bytes', 0)}",
    ]
    try:
        with open("/proc/self/statm") as statm:
            lines.append(f"# RSS = {int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')}")
    except (OSError, ValueError, IndexError):
        pass
    lines.append(f"# GCCollections = {[s['collections'] for s in gc.get_stats()]}")
    return lines
