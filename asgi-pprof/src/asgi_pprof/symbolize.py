"""Naming Python frames the way pprof names Go functions.

tracemalloc keeps only `(filename, lineno)`. pprof wants a function: its name, file and first line.
We load each file's code objects once (from its .pyc when it is current, else by compiling the
source), find the innermost code object that runs the line, and name it `module.co_qualname`, e.g.
`opentelemetry.metrics._internal._ProxyMeter.create_histogram`. Lines outside any function belong
to `module.<module>`, as in Python's own tracebacks; frames without source are named after their
file, without the angle brackets that pprof would take for C++ templates (`<frozen os>` becomes
`frozen os`).

Reading .pyc files instead of parsing source matters: this runs while tracemalloc traces every
allocation, and unmarshalling code allocates an order of magnitude less than `ast.parse`.

Every frame also gets a stable fake address, so that Go's legacy text formats (`@ 0x...` lines) and
the `symbol` endpoint can refer to it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import linecache
import marshal
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from types import CodeType

Frame = tuple[str, int]  # (filename, lineno), as tracemalloc and tracebacks give it
Function = tuple[str, int]  # (qualified name, first line)

# A line holding a comprehension also belongs to the function around it; name the function, as
# Python 3.12 does by inlining comprehensions (PEP 709).
_COMPREHENSIONS = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>"})
# Python 3.14 (PEP 649) compiles the annotations of a def (or a class) into an `__annotate__`
# function that starts on the same line and runs that line whenever something reads them. The
# line is far more often its own function's (a coroutine not started yet stands there), so on a
# shared first line the other code object wins.
_ANNOTATE = "__annotate__"


class _SourceFile:
    """The code objects of one file, innermost looked up per line and remembered."""

    def __init__(self, filename: str) -> None:
        self.module = module_name(filename)
        code = _load_code(filename)
        # Sorted by first line, `__annotate__` then outer before inner on ties.
        self.codes: list[CodeType] = []
        pending = [code] if code is not None else []
        while pending:
            current = pending.pop()
            self.codes.append(current)
            pending.extend(c for c in current.co_consts if isinstance(c, CodeType))
        self.codes.sort(key=lambda c: (c.co_firstlineno, c.co_name != _ANNOTATE))
        self.lines_of: dict[CodeType, frozenset[int]] = {}
        self.functions: dict[int, Function] = {}

    def function_at(self, lineno: int) -> Function:
        function = self.functions.get(lineno)
        if function is None:
            function = self.functions[lineno] = self._innermost(lineno)
        return function

    def _innermost(self, lineno: int) -> Function:
        for code in reversed(self.codes):  # nearest first line first: the innermost candidate
            if code.co_firstlineno > lineno or code.co_name in _COMPREHENSIONS:
                continue
            lines = self.lines_of.get(code)
            if lines is None:
                lines = self.lines_of[code] = frozenset(line for _, _, line in code.co_lines())
            if lineno in lines:
                return f"{self.module}.{code.co_qualname}", code.co_firstlineno
        return self.module, 0


def _load_code(filename: str) -> CodeType | None:
    """The module's code object: its current .pyc if there is one, else compiled from source."""
    if filename.startswith("<"):
        return None
    try:
        source_stat = os.stat(filename)
        with open(importlib.util.cache_from_source(filename), "rb") as pyc:
            header = pyc.read(16)
            flags = int.from_bytes(header[4:8], "little")
            mtime = int.from_bytes(header[8:12], "little")
            size = int.from_bytes(header[12:16], "little")
            if (
                header[:4] == importlib.util.MAGIC_NUMBER
                and flags == 0  # timestamp-based: we can tell whether it matches the source
                and mtime == int(source_stat.st_mtime) & 0xFFFFFFFF
                and size == source_stat.st_size & 0xFFFFFFFF
            ):
                return marshal.loads(pyc.read())
    except (OSError, ValueError, EOFError, TypeError, NotImplementedError):
        pass
    source = "".join(linecache.getlines(filename))
    if not source:
        return None
    try:
        return compile(source, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None


def module_name(filename: str) -> str:
    """The dotted module name of a file: the imported module's name, else its path below the
    longest matching sys.path entry (editable installs import from outside sys.path).

    `site-packages/opentelemetry/metrics/_internal/__init__.py`: `opentelemetry.metrics._internal`
    """
    if filename.startswith("<"):
        return filename.strip("<>")
    global _module_by_file
    if filename not in _module_by_file and len(sys.modules) != _modules_seen:
        _module_by_file = _imported_files()
    if filename in _module_by_file:
        return _module_by_file[filename]
    best = ""
    for entry in sys.path:
        root = os.path.join(os.path.abspath(entry or os.curdir), "")
        if filename.startswith(root) and len(root) > len(best):
            best = root
    relative = filename[len(best) :] if best else os.path.basename(filename)
    module = relative.removesuffix(".py").replace(os.sep, ".")
    return module.removesuffix(".__init__")


def _imported_files() -> dict[str, str]:
    global _modules_seen
    _modules_seen = len(sys.modules)
    files = {}
    for name, module in list(sys.modules.items()):
        filename = getattr(module, "__file__", None)
        if isinstance(filename, str) and name != "__main__":
            files[filename] = name
    return files


_module_by_file: dict[str, str] = {}
_modules_seen = 0
_files: dict[str, _SourceFile] = {}
_lock = threading.Lock()  # profiles are built in worker threads


def _new_lock_in_child() -> None:
    """A forked child gets a fresh lock: another thread of the parent may have held the old one."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def function_of(filename: str, lineno: int) -> Function:
    """The qualified name and first line of the function that runs `filename:lineno`."""
    with _lock:
        source_file = _files.get(filename)
        if source_file is None:
            source_file = _files[filename] = _SourceFile(filename)
        return source_file.function_at(lineno)


_frame_by_address: dict[int, Frame] = {}


def address_of(frame: Frame) -> int:
    """A fake program counter for `frame`, derived from it alone: the same in every process.

    Profiles are built in forked children (see `forked`), so the address cannot come from a
    counter: a child's counter would not survive it. The child reports the frames it named, and
    the parent `remember`s them for the `symbol` endpoint.
    """
    digest = hashlib.blake2b(
        f"{frame[0]}:{frame[1]}".encode(errors="backslashreplace"), digest_size=5
    )
    address = int.from_bytes(digest.digest(), "big") << 4  # 16-aligned: pprof asks for address-1
    _frame_by_address.setdefault(address, frame)
    return address


def addressed_frames() -> list[Frame]:
    """Every frame given an address so far, oldest first."""
    return list(_frame_by_address.values())


def remember(frames: Iterable[Frame]) -> None:
    """Make frames named in a forked child known to `frame_at` here."""
    for frame in frames:
        address_of(frame)


def legacy_record(head: str, stack: Sequence[Frame]) -> list[str]:
    """One record of Go's legacy text profiles (`debug=1`) for a stack of frames."""
    named = [(address_of(frame), function_of(*frame)[0], frame) for frame in stack]
    return legacy_lines(
        head, [(address, name, f"{f}:{line}") for address, name, (f, line) in named]
    )


def legacy_lines(head: str, frames: Sequence[tuple[int, str, str]]) -> list[str]:
    """One record of Go's legacy text profiles: `HEAD @ addresses`, then a `#` line per frame
    (address, function, file:line) naming its function and place. As Go does, the `@` line lists
    return addresses (one past the call) and the `#` lines the call sites; `go tool pprof` reads
    the `@` line and asks the `symbol` endpoint for names, the `#` lines are for people."""
    lines = [f"{head} @ " + " ".join(f"{address + 1:#x}" for address, _, _ in frames)]
    width = max((len(name) for _, name, _ in frames), default=0)
    for address, name, place in frames:
        lines.append(f"#\t{address:#x}\t{name:<{width}}\t{place}")
    lines.append("")
    return lines


def frame_at(address: int) -> Frame | None:
    """The frame whose address is `address`, or just below it (pprof may ask for address - 1)."""
    return _frame_by_address.get(address & ~0xF)
