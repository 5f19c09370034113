"""Heap profiles from tracemalloc, in-process, on allocations whose stacks the test knows; and
the symbolizer that names Python frames the way pprof names Go functions."""

from __future__ import annotations

import py_compile
import tracemalloc
from pathlib import Path

import pytest

from asgi_pprof import heap
from asgi_pprof.profile import ProfileBuilder
from asgi_pprof.symbolize import function_of, module_name

from pprof_decode import Profile, decode, invariant_violations, samples

# In-process: the profile of allocations whose stacks the test knows.

BLOCK_SIZE = 4096
BLOCK_COUNT = 100


def allocate_blocks() -> list[bytearray]:
    blocks = []
    for _ in range(BLOCK_COUNT):
        blocks.append(bytearray(BLOCK_SIZE))
    return blocks


def call_allocate_blocks() -> list[bytearray]:
    return allocate_blocks()


def test_location_ids_start_at_the_allocating_function() -> None:
    assert not tracemalloc.is_tracing(), "another test left tracemalloc on"
    tracemalloc.start(8)
    try:
        before = heap.capture()
        kept = call_allocate_blocks()
        after = heap.capture()
    finally:
        tracemalloc.stop()
    profile = decode(heap.encode(after.minus(before)))
    assert invariant_violations(profile) == []
    assert profile.duration_nanos > 0
    ours = [
        s
        for s in samples(profile)
        if any(f.function.endswith(".allocate_blocks") for f in s.frames)
    ]
    assert sum(s.values["inuse_space"] for s in ours) >= BLOCK_COUNT * BLOCK_SIZE
    assert sum(s.values["inuse_objects"] for s in ours) >= BLOCK_COUNT
    for sample in ours:
        assert sample.frames[0].function.endswith("test_heap.allocate_blocks")
        assert sample.frames[1].function.endswith("test_heap.call_allocate_blocks")
        assert sample.frames[0].filename == __file__
    del kept


def test_invariant_checks_catch_a_broken_profile() -> None:
    """The checker behind the tests above must be able to fail."""
    broken = Profile()
    broken.string_table.extend(["x", "x"])  # [0] not "", and repeated
    broken.function.add(id=1, name=9)  # out of range
    broken.location.add(id=0)  # zero id, no line
    broken.sample.add(location_id=[7], value=[1])  # missing location
    problems = invariant_violations(broken)
    assert any("string_table[0]" in p for p in problems)
    assert any("repeats" in p for p in problems)
    assert any("out of range" in p for p in problems)
    assert any("unique and non-zero" in p for p in problems)
    assert any("missing locations" in p for p in problems)


# The symbolizer, on a module written here.

SAMPLE_MODULE = """\
import functools

GREETING = "hello, " + str(1)  # mark: module


class Outer:  # mark: class def
    label = str("outer")  # mark: class body

    class Inner:
        def method(self):  # mark: method def
            return str("method")  # mark: method


def outer():
    def inner():  # mark: closure def
        return str("closure")  # mark: closure

    return inner


def decorator(function):
    @functools.wraps(function)
    def wrapper(*args):
        return function(*args)

    return wrapper


@decorator  # mark: decorator
def decorated():
    return str("decorated")  # mark: decorated
"""


def marks(source: str) -> dict[str, int]:
    """Line numbers of the `# mark: NAME` comments."""
    return {
        line.split("# mark: ")[1]: n
        for n, line in enumerate(source.splitlines(), 1)
        if "# mark: " in line
    }


def check_sample_module_names(path: Path, source: str, module: str) -> None:
    line = marks(source)
    assert function_of(str(path), line["module"]) == (f"{module}.<module>", 1)
    assert function_of(str(path), line["class body"]) == (f"{module}.Outer", line["class def"])
    assert function_of(str(path), line["method"]) == (
        f"{module}.Outer.Inner.method",
        line["method def"],
    )
    assert function_of(str(path), line["closure"]) == (
        f"{module}.outer.<locals>.inner",
        line["closure def"],
    )
    name, start_line = function_of(str(path), line["decorated"])
    assert name == f"{module}.decorated"
    assert line["decorator"] <= start_line < line["decorated"]


@pytest.fixture
def sample_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path, so files there are named as top-level modules."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_symbolizer_names_functions_from_source_without_a_pyc(sample_dir: Path) -> None:
    path = sample_dir / "sample_source_only.py"
    path.write_text(SAMPLE_MODULE)
    check_sample_module_names(path, SAMPLE_MODULE, "sample_source_only")
    assert not (sample_dir / "__pycache__").exists()


def test_symbolizer_names_functions_from_a_current_pyc(sample_dir: Path) -> None:
    path = sample_dir / "sample_with_pyc.py"
    path.write_text(SAMPLE_MODULE)
    py_compile.compile(
        str(path), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP
    )
    check_sample_module_names(path, SAMPLE_MODULE, "sample_with_pyc")


def test_symbolizer_ignores_a_stale_pyc(sample_dir: Path) -> None:
    path = sample_dir / "sample_stale_pyc.py"
    old_source = SAMPLE_MODULE.replace("def method", "def old_method").replace("outer", "old")
    path.write_text(old_source)
    py_compile.compile(
        str(path), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP
    )
    # Edited since: other lines, other size; possibly the same mtime second.
    new_source = "# edited\n" + SAMPLE_MODULE
    path.write_text(new_source)
    check_sample_module_names(path, new_source, "sample_stale_pyc")


def test_symbolizer_names_package_modules_by_their_import_path(sample_dir: Path) -> None:
    package = sample_dir / "sample_package"
    package.mkdir()
    (package / "__init__.py").write_text("def init_function():\n    return 1\n")
    (package / "child.py").write_text("def child_function():\n    return 2\n")
    assert module_name(str(package / "__init__.py")) == "sample_package"
    assert module_name(str(package / "child.py")) == "sample_package.child"
    assert function_of(str(package / "child.py"), 2) == (
        "sample_package.child.child_function",
        1,
    )


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("<frozen importlib._bootstrap>", "frozen importlib._bootstrap"),
        ("<string>", "string"),
        ("/nonexistent/directory/gone.py", "gone"),
    ],
)
def test_symbolizer_names_frames_without_source_after_their_file(
    filename: str, expected: str
) -> None:
    # No angle brackets: pprof would read them as C++ template arguments.
    assert function_of(filename, 10) == (expected, 0)


# Functions that share a name, or a line.

SAME_NAMES = """\
class Box:
    @property  # mark: getter start
    def size(self) -> int:
        return int("1")  # mark: getter

    @size.setter  # mark: setter start
    def size(self, value: int) -> None:
        self.value = int(value)  # mark: setter


async def annotated(first: int, second: str) -> None:  # mark: annotated def
    return None
"""


def test_functions_of_one_name_in_one_file_stay_two_functions(sample_dir: Path) -> None:
    path = sample_dir / "sample_same_names.py"
    path.write_text(SAME_NAMES)
    line = marks(SAME_NAMES)
    builder = ProfileBuilder([("objects", "count")], period_type=("objects", "count"), period=1)
    builder.add_sample([(str(path), line["setter"])], [1])  # the setter first: the later def
    builder.add_sample([(str(path), line["getter"])], [1])
    profile = decode(builder.encode())
    assert invariant_violations(profile) == []
    assert sorted((s.frames[0].function, s.frames[0].start_line) for s in samples(profile)) == [
        ("sample_same_names.Box.size", line["getter start"]),  # a decorated def starts at
        ("sample_same_names.Box.size", line["setter start"]),  # its first decorator
    ]


def test_a_def_line_is_its_functions_not_its_annotations(sample_dir: Path) -> None:
    path = sample_dir / "sample_annotated.py"
    path.write_text(SAME_NAMES)
    line = marks(SAME_NAMES)["annotated def"]
    assert function_of(str(path), line) == ("sample_annotated.annotated", line)


# Stacks cut at the frame limit: tracemalloc keeps one traceback per (frames, total depth), so
# the same frames reached from two depths come back as two equal tuples.


def allocate_at_depth(depth: int) -> list[bytearray]:
    if depth > 0:
        return allocate_at_depth(depth - 1)
    return [bytearray(BLOCK_SIZE) for _ in range(BLOCK_COUNT)]


@pytest.mark.parametrize("in_child", [False, True])
def test_equal_stacks_cut_at_the_frame_limit_add_up(in_child: bool) -> None:
    """A forked child's capture (`in_child`) keys blocks by the stack tuple's id: both tuples'
    blocks must still be summed, not one left out (seen as 22 kB of imports missing at random)."""
    tracemalloc.start(2)  # both stacks are allocate_at_depth's comprehension and its caller
    try:
        kept = [allocate_at_depth(3), allocate_at_depth(5)]
        profile = heap.capture(in_child=in_child)
    finally:
        tracemalloc.stop()
    ours = {
        stack: counts
        for stack, counts in profile.stacks.items()
        if stack[0][0] == __file__ and counts[1] >= BLOCK_SIZE
    }
    assert len(ours) == 1, ours
    [(count, size)] = ours.values()
    assert count >= 2 * BLOCK_COUNT and size >= 2 * BLOCK_COUNT * BLOCK_SIZE, (count, size)
    del kept
