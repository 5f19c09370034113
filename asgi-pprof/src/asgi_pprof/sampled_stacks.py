"""What the sampler's numbers name: its functions, locations and stacks, as its snapshots say.

The C sampler interns each function (file, qualified name, first line), each location (a function
and a line) and each stack (locations, leaf first) and numbers them; a snapshot reports the ones
made since the last snapshot and the numbers of those freed since. This mirror keeps exactly what
the sampler still holds, so it is as bounded as the sampler's tables, and it names each function
once, as the tracemalloc profile names frames (`module.qualname`).

Stacks of the kinds that have no frames (folded records, a full table, a block allocated with no
Python frame or without the GIL) are shown as one frame each, named after what they stand for, as
Go's CPU profile shows lost samples under `runtime/pprof.lostProfileEvent`.
"""

from __future__ import annotations

import array
import hashlib
import sys
from dataclasses import dataclass

from asgi_pprof.profile import encode_location, encode_varints
from asgi_pprof.symbolize import function_of, module_name

# The kinds of stacks, numbered as _memprof.c numbers them.
FRAMES, FOLDED, TABLE_FULL, NO_FRAMES, NO_GIL = range(5)
PSEUDO_FUNCTIONS = {
    FOLDED: "asgi_pprof.sampler.folded_records",
    TABLE_FULL: "asgi_pprof.sampler.table_full",
    NO_FRAMES: "asgi_pprof.sampler.no_python_frame",
    NO_GIL: "asgi_pprof.sampler.without_the_gil",
}
_PSEUDO_IDS = 1 << 32  # above every number the sampler gives
# A comprehension of Python 3.11 is named after the function around it, as 3.12 inlines them.
_COMPREHENSIONS = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>"})


@dataclass(frozen=True, slots=True)
class Function:
    id: int  # the sampler's
    name: str  # module.qualname
    filename: str
    start_line: int


@dataclass(frozen=True, slots=True, eq=False)
class Location:
    """A line of a function; one object per sampler location, compared by identity."""

    id: int  # the sampler's
    function: Function
    line: int
    address: int  # a fake program counter, for Go's legacy text and the symbol endpoint
    legacy: str  # its `#` line in Go's legacy text (made once: a text repeats it per record)

    @property
    def filename(self) -> str:
        return self.function.filename

    @property
    def name(self) -> str:
        return self.function.name


Stack = tuple[Location, ...]  # leaf first


def _address(function: Function, line: int) -> int:
    """Derived from the names alone: the same in every process (see symbolize.address_of)."""
    key = f"{function.filename}:{line}:{function.name}".encode(errors="backslashreplace")
    return int.from_bytes(hashlib.blake2b(key, digest_size=5).digest(), "big") << 4


def _signed(number: int) -> int:
    """A C int read back as an unsigned 32-bit number (a line of -1: none)."""
    return number - (1 << 32) if number >= 1 << 31 else number


def _name(filename: str, qualname: str, first_line: int) -> tuple[str, int]:
    if sys.version_info < (3, 12) and qualname.rsplit(".", 1)[-1] in _COMPREHENSIONS:
        return function_of(filename, first_line)  # the function around it, from its source
    return f"{module_name(filename)}.{qualname}", first_line


def _location(location_id: int, function: Function, line: int) -> Location:
    address = _address(function, line)
    legacy = f"#\t{address:#x}\t{function.name}\t{function.filename}:{line}"
    return Location(location_id, function, line, address, legacy)


def _pseudo_stack(kind: int) -> Stack:
    function = Function(_PSEUDO_IDS + kind, PSEUDO_FUNCTIONS[kind], "asgi_pprof", 0)
    return (_location(_PSEUDO_IDS + kind, function, 0),)


_PSEUDO_STACKS = {kind: _pseudo_stack(kind) for kind in PSEUDO_FUNCTIONS}


def pseudo_stack(kind: int) -> Stack:
    """The one-frame stack that stands for samples of `kind` (FOLDED, TABLE_FULL...)."""
    return _PSEUDO_STACKS[kind]


class SampledStacks:
    """The sampler's tables as of the last snapshot, for one start of it (a generation)."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self._clear()

    def _clear(self) -> None:
        self.functions: dict[int, Function] = {}
        # One Function per name, file and first line: a comprehension of 3.11, named after the
        # function around it, is the sampler's function apart, and pprof wants them one.
        self._named: dict[tuple[str, str, int], tuple[Function, int]] = {}  # and how many ids
        self._placed: dict[tuple[int, int], tuple[Location, int]] = {}  # the same, by line
        self.locations: dict[int, Location] = {}
        self.stacks: dict[int, Stack] = {}
        self.by_address: dict[int, Location] = {}
        self._encoded_stacks: dict[int, bytes] = {}  # a stack's location ids, as varints
        self._encoded_locations: dict[int, bytes] = {}
        self._legacy_stacks: dict[int, tuple[str, str]] = {}

    def update(
        self,
        resync: bool,
        stacks: bytes,
        locations: bytes,
        functions: list[tuple[int, str, str, int, bool]],
        dead: tuple[bytes, bytes, bytes],
    ) -> None:
        """Take in a snapshot's news: what is new, then what was freed. `stacks` holds (id, kind,
        frames, location ids...) and `locations` (id, function id, line) as '<I' numbers."""
        if resync:  # the sampler reports everything again
            self._clear()
        for function_id, filename, qualname, first_line, _own in functions:
            name, start_line = _name(filename, qualname, first_line)
            key = (name, filename, start_line)
            function, ids = self._named.get(key, (None, 0))
            if function is None:
                function = Function(function_id, name, filename, start_line)
            self._named[key] = (function, ids + 1)
            self.functions[function_id] = function
        numbers = array.array("I", locations)
        for at in range(0, len(numbers), 3):
            location_id, function_id, line = numbers[at : at + 3]
            function = self.functions[function_id]
            key = (function.id, _signed(line))
            location, ids = self._placed.get(key, (None, 0))
            if location is None:
                location = _location(location_id, function, _signed(line))
                self.by_address[location.address] = location
            self._placed[key] = (location, ids + 1)
            self.locations[location_id] = location
        numbers = array.array("I", stacks)
        at, known = 0, self.locations
        while at < len(numbers):
            stack_id, kind, nframe = numbers[at : at + 3]
            if kind == FRAMES:
                self.stacks[stack_id] = tuple(
                    map(known.__getitem__, numbers[at + 3 : at + 3 + nframe])
                )
            else:
                self.stacks[stack_id] = _PSEUDO_STACKS[kind]
            at += 3 + nframe
        dead_stacks, dead_locations, dead_functions = (array.array("I", ids) for ids in dead)
        for stack_id in dead_stacks:
            self.stacks.pop(stack_id, None)
            self._encoded_stacks.pop(stack_id, None)
            self._legacy_stacks.pop(stack_id, None)
        for location_id in dead_locations:
            location = self.locations.pop(location_id, None)
            if location is None:
                continue
            key = (location.function.id, location.line)
            placed, ids = self._placed[key]
            if ids > 1:
                self._placed[key] = (placed, ids - 1)
                continue
            del self._placed[key]
            if self.by_address.get(location.address) is location:
                del self.by_address[location.address]
            self._encoded_locations.pop(location.id, None)
        for function_id in dead_functions:
            function = self.functions.pop(function_id, None)
            if function is not None:
                key = (function.name, function.filename, function.start_line)
                named, ids = self._named[key]
                if ids > 1:
                    self._named[key] = (named, ids - 1)
                else:
                    del self._named[key]

    def encoded_stack(self, stack_id: int) -> bytes:
        """The stack's location ids as profile.proto's packed varints, made once."""
        encoded = self._encoded_stacks.get(stack_id)
        if encoded is None:
            ids = [location.id for location in self.stacks[stack_id]]
            encoded = self._encoded_stacks[stack_id] = encode_varints(ids)
        return encoded

    def legacy_stack(self, stack_id: int, stack: Stack) -> tuple[str, str]:
        """A stack in Go's legacy text: the `@` line's addresses and the `#` lines, made once."""
        legacy = self._legacy_stacks.get(stack_id)
        if legacy is None:
            addresses = " ".join([f"{location.address + 1:#x}" for location in stack])
            legacy = (addresses, "\n".join([location.legacy for location in stack]))
            if self.stacks.get(stack_id) is stack:
                self._legacy_stacks[stack_id] = legacy
        return legacy

    def encoded_location(self, location: Location) -> bytes:
        """The Location message, made once: its numbers are the sampler's, stable while it runs."""
        encoded = self._encoded_locations.get(location.id)
        if encoded is None:
            encoded = encode_location(
                location.id, location.function.id, location.line, location.address
            )
            if location.id < _PSEUDO_IDS:
                self._encoded_locations[location.id] = encoded
        return encoded
