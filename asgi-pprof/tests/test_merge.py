"""Merging workers' profiles (asgi_pprof.merge), and PPROF_MULTIPROC_DIR's checks at startup."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from asgi_pprof import PprofApp, combine, merge, multiproc
from asgi_pprof.asgi import Answer, error
from asgi_pprof.asgi import profile as profile_answer
from asgi_pprof.profile import ProfileBuilder

from go_pprof import run_pprof
from pprof_decode import decode, invariant_violations, samples

TYPES = [("inuse_objects", "count"), ("inuse_space", "bytes")]


def worker_profile(leaf_line: int, value: int, thread: str, time_nanos: int = 10**18) -> bytes:
    """A profile like a worker's: a stack shared with the others, one leaf of its own."""
    builder = ProfileBuilder(
        sample_types=TYPES,
        period_type=("space", "bytes"),
        period=524288,
        default_sample_type="inuse_space",
        time_nanos=time_nanos,
        duration_nanos=2_000_000_000,
        comments=["the same comment in every worker"],
    )
    shared = (__file__, 10)
    builder.add_sample([(__file__, leaf_line), shared], [1, value], {"thread": thread})
    builder.add_sample([shared], [2, 2 * value], {"thread": thread}, {"bytes": 64})
    return builder.encode()


def test_samples_keep_their_values_and_labels_and_gain_their_pid() -> None:
    first = merge.decode(worker_profile(20, 100, "MainThread"))
    second = merge.decode(worker_profile(30, 7, "worker", time_nanos=10**18 + 500_000_000))
    merged = decode(merge.merge([(101, first), (202, second)], ["a note"]))
    assert invariant_violations(merged) == []  # strings, functions, locations each once
    found = {
        (s.labels["pid"], s.labels["thread"], tuple(f.line for f in s.frames)): (
            s.values["inuse_space"],
            s.num_labels,
        )
        for s in samples(merged)
    }
    assert found == {
        ("101", "MainThread", (20, 10)): (100, {}),
        ("101", "MainThread", (10,)): (200, {"bytes": 64}),
        ("202", "worker", (30, 10)): (7, {}),
        ("202", "worker", (10,)): (14, {"bytes": 64}),
    }
    comments = [merged.string_table[i] for i in merged.comment]
    assert comments == ["the same comment in every worker", "a note"]
    # From the first start to the last end.
    assert merged.time_nanos == 10**18 and merged.duration_nanos == 2_500_000_000
    assert merged.string_table[merged.default_sample_type] == "inuse_space"


def test_pprof_reads_the_merged_profile_by_pid(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    answers = [
        (101, profile_answer("heap", worker_profile(20, 100, "MainThread"))),
        (202, profile_answer("heap", worker_profile(30, 7, "worker"))),
    ]
    combined = combine.combine(answers, [(303, "did not answer in 2 s")])
    path = tmp_path / "merged.pb.gz"
    path.write_bytes(combined.body)
    tags = run_pprof(go, "-tags", str(path))
    assert "pid:" in tags and "101" in tags and "202" in tags
    focused = run_pprof(go, "-top", "-tagfocus=pid=202", "-sample_index=inuse_space", str(path))
    assert "21B" in focused  # 7 + 14: worker 202's alone
    headers = dict(combined.headers)
    assert headers[combine.WORKERS_HEADER] == "101 202"
    assert headers[combine.FAILED_HEADER] == "303: did not answer in 2 s"
    assert headers["content-disposition"] == 'attachment; filename="heap"'


def test_errors_are_named_and_nobody_answering_gives_this_workers_answer() -> None:
    good = profile_answer("heap", worker_profile(20, 100, "MainThread"))
    conflict = error(409, "Could not enable CPU profiling: in use")
    combined = combine.combine([(1, good), (2, conflict)], [])
    assert dict(combined.headers)[combine.FAILED_HEADER] == (
        "2: answered 409: Could not enable CPU profiling: in use"
    )
    alone = combine.combine([(1, error(400, "bad")), (2, error(400, "bad"))], [])
    assert alone.status == 400 and alone.body == b"bad"


def test_a_profile_of_another_kind_is_left_out_and_named() -> None:
    heap = profile_answer("heap", worker_profile(20, 100, "MainThread"))
    builder = ProfileBuilder([("goroutine", "count")], ("goroutine", "count"), 1)
    builder.add_sample([(__file__, 5)], [3])
    other = profile_answer("goroutine", builder.encode())
    garbage = Answer(200, b"\x1f\x8bnot gzip", "application/octet-stream")
    combined = combine.combine([(1, heap), (2, other), (3, garbage)], [])
    headers = dict(combined.headers)
    assert headers[combine.WORKERS_HEADER] == "1"
    assert "2: its profile could not be merged" in headers[combine.FAILED_HEADER]
    assert "3: its profile could not be merged" in headers[combine.FAILED_HEADER]
    assert {s.labels["pid"] for s in samples(decode(combined.body))} == {"1"}


def test_texts_are_each_workers_in_turn() -> None:
    texts = [(7, Answer(200, b"heap profile: 1\n", "text/plain")), (8, error(409, "busy"))]
    combined = combine.combine(texts, [(9, "did not answer in 2 s")], ["worker 5 had exited"])
    assert combined.body.decode() == (
        "# pid 8: no answer: answered 409: busy\n\n"
        "# pid 9: no answer: did not answer in 2 s\n\n"
        "# worker 5 had exited\n\n"
        "# pid 7\nheap profile: 1\n"
    )


@pytest.mark.parametrize(
    "value, complaint",
    [
        ("/no/such/directory", "is not an existing directory"),
        ("/" + "d" * 100, "is not an existing directory"),
    ],
)
def test_a_bad_directory_stops_the_app_naming_the_variable(value: str, complaint: str) -> None:
    with pytest.raises(multiproc.MultiprocConfigError, match=complaint) as raised:
        PprofApp(multiproc_dir=value)
    assert str(raised.value).startswith(f"PPROF_MULTIPROC_DIR={value!r}")


def test_a_directory_too_long_for_a_socket_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    with pytest.raises(multiproc.MultiprocConfigError, match="too long for a unix socket"):
        multiproc.directory_from_environ({multiproc.DIR_VARIABLE: str(deep)})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    with pytest.raises(multiproc.MultiprocConfigError, match="not writable"):
        multiproc.directory_from_environ({multiproc.DIR_VARIABLE: str(tmp_path)})


@pytest.mark.parametrize("value", ["0", "301", "2.5", "two", "٣"])
def test_a_bad_timeout_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(multiproc.MultiprocConfigError) as raised:
        multiproc.timeout_from_environ({multiproc.TIMEOUT_VARIABLE: value})
    assert str(raised.value).startswith(f"PPROF_MULTIPROC_TIMEOUT_SECONDS={value!r}")
    assert "from 1 to 300" in str(raised.value)


def test_no_directory_no_socket() -> None:
    assert PprofApp(multiproc_dir="").workers is None
    assert multiproc.timeout_from_environ({}) == multiproc.DEFAULT_TIMEOUT_SECONDS


def test_a_sample_without_a_stack_or_labels_is_kept() -> None:
    builder = ProfileBuilder([("goroutine", "count")], ("goroutine", "count"), 1)
    builder.add_sample([], [4])  # no location ids: its values come first in the message
    builder.add_sample([(__file__, 5)], [1])
    merged = decode(merge.merge([(42, merge.decode(builder.encode()))]))
    found = sorted((len(s.frames), s.values["goroutine"], s.labels) for s in samples(merged))
    assert found == [(0, 4, {"pid": "42"}), (1, 1, {"pid": "42"})]
