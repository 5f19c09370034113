"""The sampler stays small and safe whatever the workload does: its tables are bounded, it pins no
code object, it keeps two functions at one place apart, it starts clean after a stop, and it
belongs to the interpreter that started it.

Each test asserts counts and sizes, never times (times are in benchmarks/sampled_heap_bounds.py).
"""

from __future__ import annotations

import importlib
import random
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from asgi_pprof import sampled_profile, sampled_stacks, sampling

from pprof_decode import decode
from sampler_helpers import require_sampler

require_sampler()
MAX_BYTES = 1 << 20  # a small bound, quick to reach


@pytest.fixture(autouse=True)
def sampler_stopped() -> Iterator[None]:
    assert not tracemalloc.is_tracing(), "another test left tracemalloc on"
    sampling.stop()
    yield
    sampling.stop()


def random_sizes(count: int, below: int) -> None:
    draw = random.Random(1).randrange
    for _ in range(count):
        bytes(draw(1, below))  # one line, nothing kept


def test_random_sizes_keep_a_few_hundred_records_within_the_bound() -> None:
    """Records are keyed by size class, not exact size: one line allocating random sizes below
    1 MiB makes a record per class it hits, not one per size (735,002 before)."""
    sampling.start(rate=4096, max_bytes=MAX_BYTES)
    random_sizes(100_000, 1 << 20)
    heap = sampling.capture()
    stats = heap.stats
    mine = [r for r in heap.records if r.stack[0].name.endswith("random_sizes")]
    classes = sampling.size_class((1 << 20) + sys.getsizeof(b""))  # with the bytes header
    print(f"{len(mine)} records of the line, {stats['records']} in all, {stats['own_bytes']} B")
    assert 50 < len(mine) <= classes
    assert stats["records"] < 2000
    assert stats["own_bytes"] <= MAX_BYTES
    assert len(sampled_profile.build(heap, "allocs")) < 64 * 1024


def leaf(number: int) -> bytes:
    return bytes(100 + number % 7)


def make_branching_functions(depth: int) -> Callable[[int], None]:
    """A call tree `depth` levels deep whose every path is a distinct stack: 2**depth stacks."""
    source = ["def level_0(path):\n    leaf(path)\n"]
    for level in range(1, depth + 1):
        source.append(
            f"def level_{level}(path):\n"
            f"    if path >> {level - 1} & 1:\n"
            f"        level_{level - 1}(path)\n"
            f"    else:\n"
            f"        level_{level - 1}(path)\n"
        )
    namespace: dict[str, object] = {"leaf": leaf}
    exec(compile("".join(source), "<branching>", "exec"), namespace)
    return namespace[f"level_{depth}"]  # type: ignore[return-value]


def test_a_hundred_thousand_stacks_stay_within_the_bound_and_say_so() -> None:
    top = make_branching_functions(17)  # 131,072 distinct stacks
    sampling.start(rate=1, max_bytes=MAX_BYTES)
    for path in range(100_000):
        top(path)
    heap = sampling.capture()
    stats = heap.stats
    print(stats)
    assert stats["own_bytes"] <= MAX_BYTES
    assert stats["records"] < MAX_BYTES // 64  # no more than the bound can hold
    folded = [
        r for r in heap.records if r.stack is sampled_stacks.pseudo_stack(sampled_stacks.FOLDED)
    ]
    full = [
        r for r in heap.records if r.stack is sampled_stacks.pseudo_stack(sampled_stacks.TABLE_FULL)
    ]
    # What did not fit is counted, not lost: every sample is in some record.
    assert sum(r.allocs for r in heap.records) == stats["samples"]
    assert folded and folded[0].allocs > 0 and stats["folded"] > 0
    profile = sampled_profile.build(heap, "allocs")
    assert len(profile) < 2 * MAX_BYTES
    comments = decode(profile).string_table
    assert any("folded into asgi_pprof.sampler.folded_records" in c for c in comments)
    if full:
        assert any("tables were full" in c for c in comments)
    # A new start begins with empty tables: its first profile holds only its own locations.
    sampling.stop()
    sampling.start(rate=1)
    keep = [leaf(1) for _ in range(10)]
    heap = sampling.capture()
    profile = decode(sampled_profile.build(heap, "heap"))
    assert len(profile.location) < 300
    assert not any("branching" in s for s in profile.string_table)
    del keep


def test_stacks_past_the_bound_with_every_block_alive_go_to_the_table_full_record() -> None:
    """Nothing can be folded when every record holds a live block: past the bound, new stacks'
    samples go to one visible record, counted in stats() and said in the profile and its text."""
    top = make_branching_functions(14)  # 16,384 distinct stacks, each block kept
    kept: list[bytes] = []
    sampling.start(rate=1, max_bytes=sampling.MIN_MAX_BYTES)
    with_leaf = {"leaf": lambda number: kept.append(leaf(number))}
    top.__globals__.update(with_leaf)
    for path in range(1 << 14):
        top(path)
    heap = sampling.capture()
    stats = heap.stats
    full = [
        r for r in heap.records if r.stack is sampled_stacks.pseudo_stack(sampled_stacks.TABLE_FULL)
    ]
    print({k: stats[k] for k in ("records", "own_bytes", "table_full", "folded")})
    assert stats["own_bytes"] <= sampling.MIN_MAX_BYTES
    assert len(full) == 1 and full[0].allocs == stats["table_full"] > 1000
    assert sum(r.allocs for r in heap.records) == stats["samples"]
    notes = decode(sampled_profile.build(heap, "heap")).string_table
    assert any(f"tables were full: {stats['table_full']} samples" in c for c in notes)
    assert f"# TableFullSamples = {stats['table_full']}" in sampled_profile.render_text(heap)
    sampling.stop()
    sampling.start(rate=1)
    assert sampling.stats()["table_full"] == 0  # a new start counts afresh
    kept.clear()


GENERATED_FUNCTIONS = """
import gc, sys, weakref
from asgi_pprof import sampling
if sys.argv[1] == "sampler":
    sampling.start(rate=1)
alive = weakref.WeakSet()
for number in range(2000):
    namespace = {}
    exec(f"def generated_{number}():\\n    return bytearray({1000 + number})\\n", namespace)
    function = namespace[f"generated_{number}"]
    function()
    alive.add(function.__code__)
    del function, namespace
gc.collect()
sampled = any(r.stack[0].name.endswith("generated_1999") for r in sampling.capture().records)
print(len(alive), sampled)
"""


@pytest.mark.parametrize("profiler", ["sampler", "none"])
def test_generated_functions_are_freed_while_the_sampler_runs(profiler: str) -> None:
    """Records keep names, not code objects: 2,000 functions made with exec (as namedtuple,
    dataclasses or ORMs make them), called once and deleted, are all freed, as they are with no
    profiler. In a process of its own: free-threaded 3.13 keeps every function and code object
    for good once a second thread has run (CPython's deferred reference counting, until 3.14)."""
    run = subprocess.run(
        [sys.executable, "-c", GENERATED_FUNCTIONS, profiler],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0", str(profiler == "sampler")]


MODULE_BEFORE = """\
def before():
    return bytearray(4321)
"""
MODULE_AFTER = """\
def after():
    return bytearray(4321)
"""


def test_a_reloaded_module_keeps_two_functions_at_one_line_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames are known by their function, not by file and line alone: after a reload that puts
    another function at the same line, the old function's samples keep the old name."""
    path = tmp_path / "reloaded_module.py"
    path.write_text(MODULE_BEFORE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("reloaded_module")
    sampling.start(rate=1)
    keep = [module.before()]
    path.write_text(MODULE_AFTER + "# reloaded\n")  # another size: the import system sees it
    importlib.invalidate_caches()
    module = importlib.reload(module)
    keep.append(module.after())
    heap = sampling.capture()
    names = {r.stack[0].name for r in heap.records if r.size == 4322}
    assert names == {"reloaded_module.before", "reloaded_module.after"}
    places = {(r.stack[0].filename, r.stack[0].line) for r in heap.records if r.size == 4322}
    assert places == {(str(path), 2)}
    del sys.modules["reloaded_module"], keep


def test_stop_forgets_everything_and_restarts_clean() -> None:
    sampling.start(rate=1)
    keep = [leaf(n) for n in range(100)]
    assert sampling.capture().records
    sampling.stop()
    assert sampling.stats()["own_bytes"] == 0
    assert sampling.capture().records == []
    sampling.start(rate=1)
    stats = sampling.capture().stats
    assert stats["records"] <= 10 and stats["locations"] <= 300
    del keep


SUBINTERPRETER_CODE = """
import sys
sys.path[:0] = {path!r}
from asgi_pprof import sampling
with open({out!r}, "w") as out:
    for action in (sampling.stop, sampling.capture, lambda: sampling.start(rate=7)):
        try:
            action()
            out.write("allowed\\n")
        except sampling.SamplingUnavailable as error:
            out.write(f"refused: {{error}}\\n")
"""


def assert_every_action_refused(out: Path, actions: int) -> None:
    """What the sub-interpreter wrote: each action refused, and the sampler still the main one's."""
    lines = out.read_text().splitlines()
    assert len(lines) == actions
    assert all(line.startswith("refused:") for line in lines), lines
    assert "belongs to the interpreter that started it" in lines[0]
    assert sampling.is_running() and sampling.stats()["rate"] == 4096


def test_a_subinterpreter_cannot_stop_restart_or_read_the_sampler(tmp_path: Path) -> None:
    testcapi = pytest.importorskip("_testcapi", reason="a build without test modules")
    sampling.start(rate=4096)
    out = tmp_path / "out.txt"
    code = SUBINTERPRETER_CODE.format(path=sys.path, out=str(out))
    assert testcapi.run_in_subinterp(code) == 0
    assert_every_action_refused(out, actions=3)


# The extension alone, loaded by file: on a free-threaded build the package cannot be imported in
# a sub-interpreter at all (_tracemalloc refuses to load there), but the extension can.
EXTENSION_IN_SUBINTERPRETER_CODE = """
import importlib.util
spec = importlib.util.spec_from_file_location("asgi_pprof._memprof", {path!r})
memprof = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memprof)
with open({out!r}, "w") as out:
    for action in (memprof.stop, memprof.snapshot):
        try:
            action()
            out.write("allowed\\n")
        except RuntimeError as error:
            out.write(f"refused: {{error}}\\n")
"""


def test_a_subinterpreter_cannot_stop_or_read_the_sampler_through_the_extension(
    tmp_path: Path,
) -> None:
    """The same refusal from C, through 3.13's `_interpreters`: it runs where `_testcapi` is not
    built (CI's free-threaded 3.13t has no test modules)."""
    interpreters = pytest.importorskip("_interpreters", reason="_interpreters is 3.13's")
    from asgi_pprof import _memprof

    sampling.start(rate=4096)
    out = tmp_path / "out.txt"
    code = EXTENSION_IN_SUBINTERPRETER_CODE.format(path=_memprof.__file__, out=str(out))
    # "legacy": the main interpreter's GIL and allocator, as the extension requires.
    interpreter = interpreters.create(interpreters.new_config("legacy"))
    try:
        failure = interpreters.exec(interpreter, code)
    finally:
        interpreters.destroy(interpreter)
    assert failure is None, failure
    assert_every_action_refused(out, actions=2)
    assert sampling.capture().records is not None  # the main interpreter still reads it
