"""The profile reader: decoding profile.proto, the top list as pprof computes it, the top line."""

from __future__ import annotations

import gzip
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from asgi_pprof import heap
from asgi_pprof.reader import (
    Profile,
    Sample,
    format_top,
    kept_functions,
    read_profile,
    top_functions,
    top_line,
)

import pprof_decode
from go_pprof import run_pprof


def bytes_profile(samples: list[Sample]) -> Profile:
    return Profile([("inuse_space", "bytes")], samples, "inuse_space")


def frame(function: str, filename: str = "/x.py", line: int = 1) -> tuple[str, str, int]:
    return function, filename, line


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def test_read_profile_reads_unpacked_repeated_fields_and_negative_values() -> None:
    """Go writes short repeated fields unpacked; a growth profile has negative values."""
    strings = ["", "inuse_objects", "count", "inuse_space", "bytes", "f", "g", "/a.py"]
    profile = b"".join(
        [
            field(1, field(1, 1) + field(2, 2)),  # sample_type inuse_objects/count
            field(1, field(1, 3) + field(2, 4)),  # sample_type inuse_space/bytes
            # a sample: location ids 1, 2 and values -3, -300, all unpacked
            field(2, field(1, 1) + field(1, 2) + field(2, -3) + field(2, -300)),
            field(4, field(1, 1) + field(4, field(1, 1) + field(2, 10))),  # location 1: f, line 10
            field(4, field(1, 2) + field(4, field(1, 2) + field(2, 20))),  # location 2: g, line 20
            field(5, field(1, 1) + field(2, 5) + field(4, 7)),  # function 1: f in /a.py
            field(5, field(1, 2) + field(2, 6) + field(4, 7)),  # function 2: g in /a.py
            *(field(6, text.encode()) for text in strings),
        ]
    )
    heap = read_profile(gzip.compress(profile))
    assert heap.sample_types == [("inuse_objects", "count"), ("inuse_space", "bytes")]
    assert heap.samples == [Sample((("f", "/a.py", 10), ("g", "/a.py", 20)), [-3, -300])]
    assert read_profile(profile) == heap  # not gzipped: read as it is


def test_top_functions_counts_flat_at_the_leaf_and_cum_once_per_stack() -> None:
    heap = bytes_profile(
        [
            Sample((frame("leaf_a"), frame("middle"), frame("root")), [100]),
            Sample((frame("leaf_b"), frame("middle"), frame("root")), [50]),
            # recursion: `middle` twice in one stack still counts once in its cum
            Sample((frame("middle"), frame("middle"), frame("root")), [10]),
        ]
    )
    rows = {row.function: (row.flat, row.cum) for row in top_functions(heap)}
    assert rows == {
        "leaf_a": (100, 100),
        "leaf_b": (50, 50),
        "middle": (10, 160),
        "root": (0, 160),
    }
    # pprof -top's order: by flat, then by name
    assert [row.function for row in top_functions(heap)] == [
        "leaf_a",
        "leaf_b",
        "middle",
        "root",
    ]
    assert heap.total() == 160


def test_a_function_whose_cum_equals_the_cutoff_is_kept_as_pprof_keeps_it() -> None:
    # Total 1,000 bytes: pprof's default cutoff is 0.5% of it, 5 bytes, and it drops cum < 5.
    heap = bytes_profile(
        [
            Sample((("big", "a.py", 1),), [991]),
            Sample((("at_cutoff", "a.py", 2),), [5]),
            Sample((("below_cutoff", "a.py", 3),), [4]),
        ]
    )
    assert [row.function for row in kept_functions(heap)] == ["big", "at_cutoff"]


def test_format_top_drops_what_pprof_drops_and_sums_the_rest() -> None:
    heap = bytes_profile(
        [
            Sample((frame("big"),), [3 * 1024 * 1024]),
            Sample((frame("medium"),), [1024 * 1024]),
            Sample((frame("tiny"),), [100]),  # under 0.5% of the total: dropped
        ]
    )
    text = format_top(heap, 10)
    lines = text.splitlines()
    assert lines[0] == "Showing nodes accounting for 4MB, 100% of 4MB total"
    assert lines[1] == "Dropped 1 node (cum <= 0.02MB)"  # pprof: singular for one
    assert lines[2] == "      flat  flat%   sum%        cum   cum%"
    assert lines[3].split() == ["3MB", "75.00%", "75.00%", "3MB", "75.00%", "big"]
    assert lines[4].split() == ["1MB", "25.00%", "100%", "1MB", "25.00%", "medium"]
    assert "tiny" not in text


def test_top_line_is_the_line_of_a_file_most_of_the_value_comes_from(tmp_path: Path) -> None:
    source = tmp_path / "service" / "main.py"
    source.parent.mkdir()
    source.write_text("a = 1\nb = build()  # the leak\nc = 3\n")
    main = str(source)

    def sample(value: int, line: int | None, leaf: str = "lib.alloc") -> Sample:
        stack = [(leaf, "/lib.py", 1)]
        if line is not None:
            stack += [("service.main.handle", main, line), ("service.main.handle", main, 1)]
        return Sample((*stack, ("server.run", "/server.py", 9)), [value])

    profile = bytes_profile(
        [
            sample(5000, 2),
            sample(3000, 2),
            sample(2000, 3),  # another line: less
            sample(1000, None),  # in the library, not from main.py
            sample(99_999, 2, leaf="other.alloc"),  # its leaf is not in `lib.`: not counted
        ]
    )
    line = top_line(profile, "service/main.py", "lib.")
    assert line is not None
    # The innermost frame in the file counts (line 2), not the outer one (line 1).
    assert (line.filename, line.line, line.source) == (main, 2, "b = build()  # the leak")
    assert (line.value, line.matching_value) == (8000, 11_000)
    assert top_line(profile, "other/main.py", "lib.") is None  # the end of the path must match
    assert top_line(bytes_profile([]), "service/main.py") is None


def captured_heap() -> bytes:
    """A real heap profile of this process, as the endpoint encodes it."""
    tracemalloc.start(8)
    try:
        kept = [bytearray(4096) for _ in range(100)]
        profile = heap.capture()
    finally:
        tracemalloc.stop()
    del kept
    return heap.encode(profile)


def test_a_served_profile_reads_the_same_as_in_an_independent_decoder() -> None:
    data = captured_heap()
    mine = read_profile(data)
    theirs = pprof_decode.decode(data)
    assert mine.sample_types == [("inuse_objects", "count"), ("inuse_space", "bytes")]
    assert [(s.stack, s.values) for s in mine.samples] == [
        (
            tuple((f.function, f.filename, f.line) for f in s.frames),
            [s.values["inuse_objects"], s.values["inuse_space"]],
        )
        for s in pprof_decode.samples(theirs)
    ]
    assert (mine.period, mine.time_nanos) == (theirs.period, theirs.time_nanos)


def test_format_top_prints_what_go_tool_pprof_prints(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    saved = tmp_path / "heap.pb.gz"
    saved.write_bytes(captured_heap())
    theirs = run_pprof(require_tool("go"), "-top", "-nodecount=10", str(saved))
    mine = format_top(read_profile(saved.read_bytes()), 10)
    assert theirs[theirs.index("Showing nodes accounting for") :] == mine
