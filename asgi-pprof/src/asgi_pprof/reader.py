"""Reading profiles back: the inverse of `profile` and `protobuf`, for scripts and tests.

    profile = read_profile(open("heap.pb.gz", "rb").read())   # any profile.proto, gzipped or not
    print(format_top(profile, 10))                            # as `go tool pprof -top` prints it
    line = top_line(profile, "app/main.py", "opentelemetry.") # the line the memory comes from

A small decoder of profile.proto's wire format (no protobuf runtime needed), a top list computed
as pprof computes it (flat at the leaf, cum once per stack, nodes under 0.5% of the total dropped,
pprof's units), and the line of one file that most of a profile's value was asked for from.
"""

from __future__ import annotations

import gzip
import linecache
from dataclasses import dataclass, field
from pathlib import PurePath

from asgi_pprof.protobuf import read_fields, read_varint

Frame = tuple[str, str, int]  # (function, file, line)

# profile.proto field numbers: what this reader needs of them.
_PROFILE_SAMPLE_TYPE, _PROFILE_SAMPLE, _PROFILE_LOCATION, _PROFILE_FUNCTION = 1, 2, 4, 5
_PROFILE_STRING_TABLE, _PROFILE_TIME_NANOS, _PROFILE_DURATION_NANOS = 6, 9, 10
_PROFILE_PERIOD_TYPE = 11
_PROFILE_PERIOD, _PROFILE_COMMENT, _PROFILE_DEFAULT_SAMPLE_TYPE = 12, 13, 14
_SAMPLE_LOCATION_ID, _SAMPLE_VALUE, _SAMPLE_LABEL = 1, 2, 3
_LABEL_KEY, _LABEL_STR, _LABEL_NUM = 1, 2, 3
_LOCATION_ID, _LOCATION_LINE = 1, 4
_LINE_FUNCTION_ID, _LINE_LINE = 1, 2
_FUNCTION_ID, _FUNCTION_NAME, _FUNCTION_FILENAME = 1, 2, 4
_VALUE_TYPE_TYPE, _VALUE_TYPE_UNIT = 1, 2

NODE_FRACTION = 0.005  # pprof's default -nodefraction


@dataclass
class Sample:
    stack: tuple[Frame, ...]  # leaf first
    values: list[int]  # one per sample type
    labels: dict[str, str] = field(default_factory=dict)
    numeric_labels: dict[str, int] = field(default_factory=dict)


@dataclass
class Profile:
    sample_types: list[tuple[str, str]]  # (type, unit), e.g. ("inuse_space", "bytes")
    samples: list[Sample]
    default_sample_type: str = ""
    period_type: tuple[str, str] = ("", "")
    period: int = 0
    time_nanos: int = 0
    duration_nanos: int = 0
    comments: list[str] = field(default_factory=list)

    def value_index(self, sample_type: str | None = None) -> int:
        """Where `sample_type`'s values are; by default pprof's: the default type, else the last."""
        wanted = sample_type or self.default_sample_type
        types = [type_ for type_, _ in self.sample_types]
        if not wanted:
            return len(types) - 1
        if wanted not in types:
            raise ValueError(f"no sample type {wanted!r} in this profile; it has {types}")
        return types.index(wanted)

    def total(self, sample_type: str | None = None) -> int:
        index = self.value_index(sample_type)
        return sum(sample.values[index] for sample in self.samples)


def _signed(number: int) -> int:
    return number - (1 << 64) if number >= 1 << 63 else number


def _integers(value: int | bytes) -> list[int]:
    """A repeated int64 field's values: packed (bytes), or one unpacked value."""
    if isinstance(value, int):
        return [_signed(value)]
    numbers, position = [], 0
    while position < len(value):
        number, position = read_varint(value, position)
        numbers.append(_signed(number))
    return numbers


def _scalars(data: bytes) -> dict[int, int]:
    """The integer fields of a message without repeated ones (ValueType, Line, Function, Label)."""
    return {number: value for number, value in read_fields(data) if isinstance(value, int)}


@dataclass
class _RawSample:
    location_ids: list[int] = field(default_factory=list)
    values: list[int] = field(default_factory=list)
    labels: list[dict[int, int]] = field(default_factory=list)


def read_profile(data: bytes) -> Profile:
    """A profile.proto message, gzipped (as served) or not."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    strings: list[str] = []
    value_types: list[dict[int, int]] = []
    raw_samples: list[_RawSample] = []
    lines_of_location: dict[int, list[tuple[int, int]]] = {}  # id: [(function id, line)]
    functions: dict[int, tuple[int, int]] = {}  # id: (name index, file index)
    scalars: dict[int, int] = {}
    period_type: dict[int, int] = {}
    comments: list[int] = []
    for number, value in read_fields(data):
        if isinstance(value, int):
            scalars[number] = value
        elif number == _PROFILE_SAMPLE_TYPE:
            value_types.append(_scalars(value))
        elif number == _PROFILE_SAMPLE:
            raw_samples.append(_read_sample(value))
        elif number == _PROFILE_LOCATION:
            location_id, lines = 0, []
            for sub_number, sub_value in read_fields(value):
                if sub_number == _LOCATION_ID and isinstance(sub_value, int):
                    location_id = sub_value
                elif sub_number == _LOCATION_LINE and isinstance(sub_value, bytes):
                    line = _scalars(sub_value)  # innermost first
                    lines.append((line.get(_LINE_FUNCTION_ID, 0), line.get(_LINE_LINE, 0)))
            lines_of_location[location_id] = lines
        elif number == _PROFILE_FUNCTION:
            function = _scalars(value)
            functions[function.get(_FUNCTION_ID, 0)] = (
                function.get(_FUNCTION_NAME, 0),
                function.get(_FUNCTION_FILENAME, 0),
            )
        elif number == _PROFILE_STRING_TABLE:
            strings.append(value.decode("utf-8", "replace"))
        elif number == _PROFILE_PERIOD_TYPE:
            period_type = _scalars(value)
        elif number == _PROFILE_COMMENT:
            comments += _integers(value)

    def frames(location_id: int) -> list[Frame]:
        found = []
        for function_id, line in lines_of_location.get(location_id, []):
            name, filename = functions.get(function_id, (0, 0))
            found.append((strings[name], strings[filename], line))
        return found

    samples = []
    for raw in raw_samples:
        sample = Sample(tuple(f for lid in raw.location_ids for f in frames(lid)), raw.values)
        for label in raw.labels:
            key = strings[label.get(_LABEL_KEY, 0)]
            if _LABEL_STR in label:
                sample.labels[key] = strings[label[_LABEL_STR]]
            else:
                sample.numeric_labels[key] = _signed(label.get(_LABEL_NUM, 0))
        samples.append(sample)
    return Profile(
        sample_types=[
            (strings[t.get(_VALUE_TYPE_TYPE, 0)], strings[t.get(_VALUE_TYPE_UNIT, 0)])
            for t in value_types
        ],
        samples=samples,
        default_sample_type=strings[scalars.get(_PROFILE_DEFAULT_SAMPLE_TYPE, 0)],
        period_type=(
            strings[period_type.get(_VALUE_TYPE_TYPE, 0)],
            strings[period_type.get(_VALUE_TYPE_UNIT, 0)],
        ),
        period=_signed(scalars.get(_PROFILE_PERIOD, 0)),
        time_nanos=_signed(scalars.get(_PROFILE_TIME_NANOS, 0)),
        duration_nanos=_signed(scalars.get(_PROFILE_DURATION_NANOS, 0)),
        comments=[strings[index] for index in comments],
    )


def _read_sample(data: bytes) -> _RawSample:
    raw = _RawSample()
    for number, value in read_fields(data):
        if number == _SAMPLE_LOCATION_ID:
            raw.location_ids += _integers(value)
        elif number == _SAMPLE_VALUE:
            raw.values += _integers(value)
        elif number == _SAMPLE_LABEL and isinstance(value, bytes):
            raw.labels.append(_scalars(value))
    return raw


# --- The top list, as `go tool pprof -top` computes and prints it ---


@dataclass
class TopRow:
    function: str
    flat: int
    cum: int


def top_functions(profile: Profile, sample_type: str | None = None) -> list[TopRow]:
    """Every function with its flat (in it) and cum (in it or below it) value, in `pprof -top`
    order: by flat, then by name."""
    index = profile.value_index(sample_type)
    flat: dict[str, int] = {}
    cum: dict[str, int] = {}
    for sample in profile.samples:
        if not sample.stack:
            continue
        value = sample.values[index]
        leaf = sample.stack[0][0]
        flat[leaf] = flat.get(leaf, 0) + value
        for function in {name for name, _, _ in sample.stack}:  # once per stack, even recursive
            cum[function] = cum.get(function, 0) + value
    rows = [TopRow(function, flat.get(function, 0), total) for function, total in cum.items()]
    rows.sort(key=lambda row: (-abs(row.flat), row.function, -abs(row.cum)))
    return rows


def kept_functions(profile: Profile, sample_type: str | None = None) -> list[TopRow]:
    """`top_functions` without those pprof drops by default: cum under 0.5% of the total (pprof
    keeps a node whose cum equals the cutoff, though it prints "Dropped ... (cum <= cutoff)")."""
    cutoff = _node_cutoff(profile.total(sample_type))
    return [row for row in top_functions(profile, sample_type) if abs(row.cum) >= cutoff]


def _node_cutoff(total: int) -> int:
    return abs(int(total * NODE_FRACTION))


_BYTE_UNITS = ("B", "kB", "MB", "GB", "TB")


def _unit_for(value: int) -> int:
    """Index in _BYTE_UNITS of the largest unit that `value` bytes fill at least once (pprof's)."""
    unit = 0
    while unit + 1 < len(_BYTE_UNITS) and abs(value) >= 1024 ** (unit + 1):
        unit += 1
    return unit


def _pprof_value(value: int, unit: int | None) -> str:
    """A value as pprof prints it: bytes scaled to `unit`; counts (unit None) as they are."""
    if unit is None:
        return str(value)
    if value == 0:
        return "0"
    text = f"{value / 1024**unit:.2f}".removesuffix(".00")
    return text + _BYTE_UNITS[unit]


def _pprof_percent(value: int, total: int) -> str:
    ratio = abs(value / total) * 100 if total else 0.0
    if 99.95 <= ratio <= 100.05:
        return "  100%"
    if ratio >= 1.0:
        return f"{ratio:5.2f}%"
    return f"{ratio:5.2g}%"


def format_top(profile: Profile, count: int, sample_type: str | None = None) -> str:
    """The first `count` functions as `go tool pprof -top -nodecount=COUNT` prints them, with
    its summary lines: the same nodes dropped, the same unit, the same columns."""
    total = profile.total(sample_type)
    every = top_functions(profile, sample_type)
    kept = kept_functions(profile, sample_type)
    shown = kept[:count]
    unit: int | None = None
    if profile.sample_types[profile.value_index(sample_type)][1] == "bytes":
        # pprof's unit: the smallest value's, unless that is under 1% of the total's unit
        nonzero = [abs(row.flat) or abs(row.cum) for row in shown if row.flat or row.cum]
        smallest = min(nonzero) if nonzero else total
        unit = _unit_for(smallest)
        if unit != _unit_for(total) and smallest * 100 < total:
            unit = _unit_for(smallest * 100)
    shown_flat = sum(row.flat for row in shown)
    lines = [
        f"Showing nodes accounting for {_pprof_value(shown_flat, unit)}, "
        f"{_pprof_percent(shown_flat, total).strip()} of {_pprof_value(total, unit)} total"
    ]
    dropped = len(every) - len(kept)
    if total and dropped:
        cutoff = _pprof_value(_node_cutoff(total), unit)
        nodes = "node" if dropped == 1 else "nodes"  # as pprof words it
        lines.append(f"Dropped {dropped} {nodes} (cum <= {cutoff})")
    if total and len(kept) > len(shown):
        lines.append(f"Showing top {len(shown)} nodes out of {len(kept)}")
    lines.append("      flat  flat%   sum%        cum   cum%")
    running = 0
    for row in shown:
        running += row.flat
        lines.append(
            f"{_pprof_value(row.flat, unit):>10} {_pprof_percent(row.flat, total)} "
            f"{_pprof_percent(running, total)} {_pprof_value(row.cum, unit):>10} "
            f"{_pprof_percent(row.cum, total)}  {row.function}"
        )
    return "\n".join(lines) + "\n"


# --- The line a profile's value comes from ---


@dataclass
class Line:
    filename: str  # as the profile names it
    line: int
    source: str  # the line's text, if the file is readable here
    value: int  # the value asked for from this line
    matching_value: int  # the value of every sample counted (leaf_prefix matched), in all


def top_line(
    profile: Profile, in_file: str, leaf_prefix: str = "", sample_type: str | None = None
) -> Line | None:
    """The line of `in_file` (the end of a path, such as "app/main.py") that most of the value
    was asked for from: per sample, the innermost frame in that file counts. Only samples whose
    leaf function starts with `leaf_prefix` count. None when no such sample passes the file."""
    index = profile.value_index(sample_type)
    wanted = PurePath(in_file).parts
    by_line: dict[tuple[str, int], int] = {}
    matching = 0
    for sample in profile.samples:
        if not sample.stack or not sample.stack[0][0].startswith(leaf_prefix):
            continue
        value = sample.values[index]
        matching += value
        for _, filename, line in sample.stack:
            if PurePath(filename).parts[-len(wanted) :] == wanted:
                by_line[filename, line] = by_line.get((filename, line), 0) + value
                break
    if not by_line:
        return None
    (filename, line), value = max(by_line.items(), key=lambda item: item[1])
    return Line(filename, line, linecache.getline(filename, line).strip(), value, matching)
