"""One profile.proto from several processes' profiles, each sample labelled with its `pid`.

What `multiproc` answers for a service run as several workers: every worker's `heap`, `allocs`,
`goroutine` or `profile`, merged as `go tool pprof` merges profiles given together, except that
samples are never added up across processes: each keeps its worker's `pid` label, so
`-tagfocus=pid=1234` shows one worker and `-tags` shows how much each holds.

Strings, functions and locations are numbered anew (a function or location that several workers
share becomes one); samples are copied with their values as encoded, their location ids renumbered
and their labels re-indexed. Every input must come from this library: one mapping, the same sample
types.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from asgi_pprof.profile import ProfileBuilder, encode_varints
from asgi_pprof.protobuf import ProtoWriter, read_fields, read_varint

# profile.proto field numbers: what the merge reads.
_PROFILE_SAMPLE_TYPE, _PROFILE_SAMPLE, _PROFILE_MAPPING, _PROFILE_LOCATION = 1, 2, 3, 4
_PROFILE_FUNCTION, _PROFILE_STRING_TABLE = 5, 6
_PROFILE_TIME_NANOS, _PROFILE_DURATION_NANOS, _PROFILE_PERIOD_TYPE, _PROFILE_PERIOD = 9, 10, 11, 12
_PROFILE_COMMENT, _PROFILE_DEFAULT_SAMPLE_TYPE = 13, 14
_SAMPLE_LOCATION_ID, _SAMPLE_VALUE, _SAMPLE_LABEL = 1, 2, 3
_LABEL_KEY, _LABEL_STR, _LABEL_NUM = 1, 2, 3
_MAPPING_FILENAME = 5
_LOCATION_ID, _LOCATION_MAPPING_ID, _LOCATION_ADDRESS, _LOCATION_LINE = 1, 2, 3, 4
_LINE_FUNCTION_ID, _LINE_LINE = 1, 2
_FUNCTION_ID, _FUNCTION_NAME, _FUNCTION_FILENAME, _FUNCTION_START_LINE = 1, 2, 4, 5
_VALUE_TYPE_TYPE, _VALUE_TYPE_UNIT = 1, 2
_MAPPING_ID_PYTHON = 1  # the one mapping every profile of this library has

PID_LABEL = "pid"


class MergeError(ValueError):
    """A profile that cannot join the others (another kind, or not this library's)."""


@dataclass
class _Location:
    id: int
    mapping_id: int
    address: int
    lines: list[tuple[int, int]]  # (function id, line), innermost first


@dataclass
class DecodedProfile:
    """A profile.proto with its own numbering kept: what the merge renumbers."""

    strings: list[str]
    sample_types: list[tuple[str, str]]
    default_sample_type: str = ""
    period_type: tuple[str, str] = ("", "")
    period: int = 0
    time_nanos: int = 0
    duration_nanos: int = 0
    comments: list[str] = field(default_factory=list)
    mapping_file: str = "python"
    functions: dict[int, tuple[str, str, int]] = field(default_factory=dict)  # name, file, line
    locations: list[_Location] = field(default_factory=list)
    samples: list[bytes] = field(default_factory=list)  # each Sample message, as encoded


def _scalars(data: bytes) -> dict[int, int]:
    """The varint fields of a message, its others skipped: a loop without a generator, as the
    merge reads tens of thousands of small messages (lines, functions, labels)."""
    fields: dict[int, int] = {}
    position, end = 0, len(data)
    while position < end:
        key = data[position]
        if key < 0x80:
            position += 1
        else:
            key, position = read_varint(data, position)
        wire_type = key & 7
        if wire_type == 0:
            byte = data[position]
            if byte < 0x80:
                fields[key >> 3] = byte
                position += 1
            else:
                fields[key >> 3], position = read_varint(data, position)
        elif wire_type == 2:
            length, position = read_varint(data, position)
            position += length
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        else:
            raise MergeError(f"unsupported protobuf wire type {wire_type}")
    return fields


def _varints(value: int | bytes) -> list[int]:
    """A repeated integer field's values: packed (bytes), or one unpacked value."""
    if isinstance(value, int):
        return [value]
    numbers, position = [], 0
    while position < len(value):
        number, position = read_varint(value, position)
        numbers.append(number)
    return numbers


def _signed(number: int) -> int:
    return number - (1 << 64) if number >= 1 << 63 else number


def decode(data: bytes) -> DecodedProfile:
    """A profile.proto, gzipped or not, with its ids and string indexes resolved to strings."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    strings: list[str] = []
    value_types: list[dict[int, int]] = []
    scalars: dict[int, int] = {}
    period_type: dict[int, int] = {}
    comments: list[int] = []
    raw_functions: list[dict[int, int]] = []
    mappings: list[dict[int, int]] = []
    profile = DecodedProfile([], [])
    for number, value in read_fields(data):
        if isinstance(value, int):
            scalars[number] = value
        elif number == _PROFILE_SAMPLE:
            profile.samples.append(value)
        elif number == _PROFILE_LOCATION:
            profile.locations.append(_read_location(value))
        elif number == _PROFILE_FUNCTION:
            raw_functions.append(_scalars(value))
        elif number == _PROFILE_STRING_TABLE:
            strings.append(value.decode("utf-8", "replace"))
        elif number == _PROFILE_SAMPLE_TYPE:
            value_types.append(_scalars(value))
        elif number == _PROFILE_PERIOD_TYPE:
            period_type = _scalars(value)
        elif number == _PROFILE_COMMENT:
            comments += _varints(value)
        elif number == _PROFILE_MAPPING:
            mappings.append(_scalars(value))
    if len(mappings) > 1:
        raise MergeError(f"{len(mappings)} mappings: not a profile of asgi_pprof's")
    if any(location.mapping_id not in (0, _MAPPING_ID_PYTHON) for location in profile.locations):
        raise MergeError("a location refers to a mapping other than asgi_pprof's")
    try:
        profile.strings = strings
        profile.sample_types = [
            (strings[t.get(_VALUE_TYPE_TYPE, 0)], strings[t.get(_VALUE_TYPE_UNIT, 0)])
            for t in value_types
        ]
        profile.default_sample_type = strings[scalars.get(_PROFILE_DEFAULT_SAMPLE_TYPE, 0)]
        profile.period_type = (
            strings[period_type.get(_VALUE_TYPE_TYPE, 0)],
            strings[period_type.get(_VALUE_TYPE_UNIT, 0)],
        )
        profile.comments = [strings[index] for index in comments]
        if mappings:
            profile.mapping_file = strings[mappings[0].get(_MAPPING_FILENAME, 0)]
        for function in raw_functions:
            profile.functions[function.get(_FUNCTION_ID, 0)] = (
                strings[function.get(_FUNCTION_NAME, 0)],
                strings[function.get(_FUNCTION_FILENAME, 0)],
                _signed(function.get(_FUNCTION_START_LINE, 0)),
            )
    except IndexError:
        raise MergeError("a string index out of the string table") from None
    profile.period = _signed(scalars.get(_PROFILE_PERIOD, 0))
    profile.time_nanos = _signed(scalars.get(_PROFILE_TIME_NANOS, 0))
    profile.duration_nanos = _signed(scalars.get(_PROFILE_DURATION_NANOS, 0))
    return profile


def _read_location(data: bytes) -> _Location:
    location = _Location(0, 0, 0, [])
    for number, value in read_fields(data):
        if number == _LOCATION_LINE and isinstance(value, bytes):
            line = _scalars(value)
            function_id, number = line.get(_LINE_FUNCTION_ID, 0), line.get(_LINE_LINE, 0)
            location.lines.append((function_id, _signed(number)))
        elif number == _LOCATION_ID and isinstance(value, int):
            location.id = value
        elif number == _LOCATION_ADDRESS and isinstance(value, int):
            location.address = value
        elif number == _LOCATION_MAPPING_ID and isinstance(value, int):
            location.mapping_id = value
    return location


def _encode_location(location_id: int, address: int, lines: Sequence[tuple[int, int]]) -> bytes:
    location = ProtoWriter()
    location.integer(_LOCATION_ID, location_id)
    location.integer(_LOCATION_MAPPING_ID, _MAPPING_ID_PYTHON)
    location.integer(_LOCATION_ADDRESS, address)
    for function_id, line in lines:
        message = ProtoWriter()
        message.integer(_LINE_FUNCTION_ID, function_id)
        message.integer(_LINE_LINE, line)
        location.message(_LOCATION_LINE, message)
    return bytes(location.data)


def merge(profiles: Sequence[tuple[int, DecodedProfile]], notes: Sequence[str] = ()) -> bytes:
    """The gzipped profile.proto of every (pid, profile) given, samples labelled `pid`; `notes`
    are added to its comments. The first profile sets the kind; MergeError if another differs."""
    if not profiles:
        raise MergeError("no profile to merge")
    first = profiles[0][1]
    for pid, profile in profiles:
        if profile.sample_types != first.sample_types:
            raise MergeError(
                f"pid {pid}'s sample types {profile.sample_types} differ from {first.sample_types}"
            )
    start = min(profile.time_nanos for _, profile in profiles)
    end = max(profile.time_nanos + profile.duration_nanos for _, profile in profiles)
    any_window = any(profile.duration_nanos for _, profile in profiles)
    comments: list[str] = []
    for _, profile in profiles:
        comments += [comment for comment in profile.comments if comment not in comments]
    builder = ProfileBuilder(
        sample_types=first.sample_types,
        period_type=first.period_type,
        period=first.period,
        default_sample_type=first.default_sample_type,
        time_nanos=start,
        duration_nanos=end - start if any_window else 0,
        comments=[*comments, *notes],
        mapping_file=first.mapping_file,
    )
    renumbering = _Renumbering(builder)
    for pid, profile in profiles:
        renumbering.add(pid, profile)
    return builder.encode()


class _Renumbering:
    """The merged profile's functions and locations, each once, and its samples."""

    def __init__(self, builder: ProfileBuilder) -> None:
        self.builder = builder
        self.function_ids: dict[tuple[str, str, int], int] = {}
        self.location_ids: dict[tuple[int, tuple[tuple[int, int], ...]], int] = {}

    def add(self, pid: int, profile: DecodedProfile) -> None:
        functions = {old: self._function(*key) for old, key in profile.functions.items()}
        locations: dict[bytes, bytes] = {}  # by the old id as a varint: the new one
        try:
            for location in profile.locations:
                lines = tuple((functions[function], line) for function, line in location.lines)
                new_id = self._location(location.address, lines)
                locations[encode_varints([location.id])] = encode_varints([new_id])
        except KeyError as missing:
            raise MergeError(f"pid {pid}: a location refers to no function {missing}") from None
        stacks: dict[bytes, bytes] = {}
        label_fields: dict[bytes, bytes] = {}
        strings = profile.strings
        pid_label = str(pid)
        for sample in profile.samples:
            ids, values, labels = _split_sample(sample)
            stack = stacks.get(ids)
            if stack is None:
                try:
                    # Varint by varint, never decoded: a worker's profile has thousands of stacks.
                    old_ids = _VARINT.findall(ids)
                    stack = stacks[ids] = b"".join([locations[i] for i in old_ids])
                except KeyError as missing:
                    message = f"pid {pid}: a sample refers to no location {missing!r}"
                    raise MergeError(message) from None
            fields = label_fields.get(labels)
            if fields is None:
                words, numbers = _labels(labels, strings)
                words[PID_LABEL] = pid_label
                fields = label_fields[labels] = self.builder.label_fields(words, numbers)
            self.builder.add_sample_packed(stack, values, fields)

    def _function(self, name: str, filename: str, start_line: int) -> int:
        key = (name, filename, start_line)
        function_id = self.function_ids.get(key)
        if function_id is None:
            function_id = self.function_ids[key] = len(self.function_ids) + 1
            self.builder.add_function(function_id, name, filename, start_line)
        return function_id

    def _location(self, address: int, lines: tuple[tuple[int, int], ...]) -> int:
        key = (address, lines)
        location_id = self.location_ids.get(key)
        if location_id is None:
            location_id = self.location_ids[key] = len(self.location_ids) + 1
            self.builder.add_encoded_location(_encode_location(location_id, address, lines))
        return location_id


_VARINT = re.compile(rb"[\x80-\xff]*[\x00-\x7f]")  # one varint's bytes
_IDS_KEY = bytes([_SAMPLE_LOCATION_ID << 3 | 2])
_VALUES_KEY = bytes([_SAMPLE_VALUE << 3 | 2])


def _split_sample(sample: bytes) -> tuple[bytes, bytes, bytes]:
    """A Sample's location ids and values, as packed varints, and its Label fields as encoded.

    Fast where the sample is as this library writes it (packed ids, packed values, then
    labels); any other field order is read field by field."""
    position = 0
    parts = []
    for key in (_IDS_KEY, _VALUES_KEY):
        if sample[position : position + 1] != key:
            return _split_any_sample(sample)
        length, start = read_varint(sample, position + 1)
        parts.append(sample[start : start + length])
        position = start + length
    labels = sample[position:]
    if labels and labels[0] != _SAMPLE_LABEL << 3 | 2:
        return _split_any_sample(sample)
    return parts[0], parts[1], labels


def _split_any_sample(sample: bytes) -> tuple[bytes, bytes, bytes]:
    ids, values, labels = bytearray(), bytearray(), ProtoWriter()
    for number, value in read_fields(sample):
        if number == _SAMPLE_LOCATION_ID:
            ids += value if isinstance(value, bytes) else encode_varints([value])
        elif number == _SAMPLE_VALUE:
            values += value if isinstance(value, bytes) else encode_varints([value])
        elif number == _SAMPLE_LABEL and isinstance(value, bytes):
            labels.bytes(_SAMPLE_LABEL, value)
    return bytes(ids), bytes(values), bytes(labels.data)


def _labels(encoded: bytes, strings: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """The labels of a sample's Label fields (as encoded), by name."""
    words: dict[str, str] = {}
    numbers: dict[str, int] = {}
    try:
        for _, message in read_fields(encoded):
            if not isinstance(message, bytes):
                continue
            label = _scalars(message)
            key = strings[label.get(_LABEL_KEY, 0)]
            if _LABEL_STR in label:
                words[key] = strings[label[_LABEL_STR]]
            else:
                numbers[key] = _signed(label.get(_LABEL_NUM, 0))
    except IndexError:
        raise MergeError("a label's string index out of the string table") from None
    return words, numbers
