"""Building a pprof profile (profile.proto) from Python stacks, and encoding it gzipped.

A stack is a tuple of frames, leaf first; a frame is `(filename, lineno)` as tracemalloc gives it.
Each distinct frame becomes one Location with one Line, pointing at the Function that contains it
(named `module.Class.method` by `symbolize`). The single Mapping says functions, file names and line
numbers are all present, so pprof never tries to symbolize addresses of its own.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Mapping, Sequence

from asgi_pprof.protobuf import LENGTH_DELIMITED, ProtoWriter, varint_size
from asgi_pprof.symbolize import Frame, address_of, function_of

# profile.proto field numbers.
_PROFILE_SAMPLE_TYPE, _PROFILE_SAMPLE, _PROFILE_MAPPING, _PROFILE_LOCATION = 1, 2, 3, 4
_PROFILE_FUNCTION, _PROFILE_STRING_TABLE = 5, 6
_PROFILE_TIME_NANOS, _PROFILE_DURATION_NANOS, _PROFILE_PERIOD_TYPE, _PROFILE_PERIOD = 9, 10, 11, 12
_PROFILE_COMMENT, _PROFILE_DEFAULT_SAMPLE_TYPE = 13, 14
_VALUE_TYPE_TYPE, _VALUE_TYPE_UNIT = 1, 2
_SAMPLE_LOCATION_ID, _SAMPLE_VALUE, _SAMPLE_LABEL = 1, 2, 3
_LABEL_KEY, _LABEL_STR, _LABEL_NUM = 1, 2, 3
_MAPPING_ID, _MAPPING_FILENAME = 1, 5
_MAPPING_HAS_FUNCTIONS, _MAPPING_HAS_FILENAMES, _MAPPING_HAS_LINE_NUMBERS = 7, 8, 9
_LOCATION_ID, _LOCATION_MAPPING_ID, _LOCATION_ADDRESS, _LOCATION_LINE = 1, 2, 3, 4
_LINE_FUNCTION_ID, _LINE_LINE = 1, 2
_FUNCTION_ID, _FUNCTION_NAME, _FUNCTION_SYSTEM_NAME = 1, 2, 3
_FUNCTION_FILENAME, _FUNCTION_START_LINE = 4, 5

_MAPPING_ID_PYTHON = 1


class ProfileBuilder:
    """Collects samples and writes one profile.proto message."""

    def __init__(
        self,
        sample_types: Sequence[tuple[str, str]],
        period_type: tuple[str, str],
        period: int,
        default_sample_type: str = "",
        time_nanos: int = 0,
        duration_nanos: int = 0,
        comments: Sequence[str] = (),
        mapping_file: str = "python",
    ) -> None:
        self._strings: dict[str, int] = {"": 0}  # string_table[0] must be ""
        self._functions = ProtoWriter()
        self._function_ids: dict[tuple[str, str, int], int] = {}
        self._locations = ProtoWriter()
        self._location_ids: dict[Frame, int] = {}
        self._encoded_ids: dict[Frame, bytes] = {}  # each location's id as a varint
        self._samples = ProtoWriter()
        self._header = ProtoWriter()
        for type_, unit in sample_types:
            self._header.message(_PROFILE_SAMPLE_TYPE, self._value_type(type_, unit))
        self._footer = ProtoWriter()
        self._footer.integer(_PROFILE_TIME_NANOS, time_nanos)
        self._footer.integer(_PROFILE_DURATION_NANOS, duration_nanos)
        self._footer.message(_PROFILE_PERIOD_TYPE, self._value_type(*period_type))
        self._footer.integer(_PROFILE_PERIOD, period)
        self._footer.packed(_PROFILE_COMMENT, [self._string(c) for c in comments])
        self._footer.integer(_PROFILE_DEFAULT_SAMPLE_TYPE, self._string(default_sample_type))
        mapping = ProtoWriter()
        mapping.integer(_MAPPING_ID, _MAPPING_ID_PYTHON)
        mapping.integer(_MAPPING_FILENAME, self._string(mapping_file))
        mapping.integer(_MAPPING_HAS_FUNCTIONS, 1)
        mapping.integer(_MAPPING_HAS_FILENAMES, 1)
        mapping.integer(_MAPPING_HAS_LINE_NUMBERS, 1)
        self._footer.message(_PROFILE_MAPPING, mapping)

    def _string(self, value: str) -> int:
        index = self._strings.get(value)
        if index is None:
            index = self._strings[value] = len(self._strings)
        return index

    def _value_type(self, type_: str, unit: str) -> ProtoWriter:
        value_type = ProtoWriter()
        value_type.integer(_VALUE_TYPE_TYPE, self._string(type_))
        value_type.integer(_VALUE_TYPE_UNIT, self._string(unit))
        return value_type

    def _function_id(self, name: str, filename: str, start_line: int) -> int:
        # One name in one file may be several functions: a property's getter and setter, or on
        # 3.14 (PEP 649) the `__annotate__` of each annotated def in one scope. Each is its own.
        key = (name, filename, start_line)
        function_id = self._function_ids.get(key)
        if function_id is None:
            function_id = self._function_ids[key] = len(self._function_ids) + 1
            self.add_function(function_id, name, filename, start_line)
        return function_id

    def add_function(self, function_id: int, name: str, filename: str, start_line: int) -> None:
        """A Function with an id of the caller's (the sampler's tables number them)."""
        function = ProtoWriter()
        function.integer(_FUNCTION_ID, function_id)
        function.integer(_FUNCTION_NAME, self._string(name))
        function.integer(_FUNCTION_SYSTEM_NAME, self._string(name))
        function.integer(_FUNCTION_FILENAME, self._string(filename))
        function.integer(_FUNCTION_START_LINE, start_line)
        self._functions.message(_PROFILE_FUNCTION, function)

    def add_encoded_location(self, location: bytes) -> None:
        """A Location message encoded by `encode_location`, with ids of the caller's."""
        self._locations.bytes(_PROFILE_LOCATION, location)

    def location_id(self, frame: Frame) -> int:
        location_id = self._location_ids.get(frame)
        if location_id is None:
            location_id = self._location_ids[frame] = len(self._location_ids) + 1
            filename, lineno = frame
            name, start_line = function_of(filename, lineno)
            function_id = self._function_id(name, filename, start_line)
            location = encode_location(location_id, function_id, lineno, address_of(frame))
            self.add_encoded_location(location)
        return location_id

    def _encoded_id(self, frame: Frame) -> bytes:
        writer = ProtoWriter()
        writer.varint(self.location_id(frame))
        encoded = self._encoded_ids[frame] = bytes(writer.data)
        return encoded

    def add_sample(
        self,
        stack: Sequence[Frame],
        values: Sequence[int],
        labels: Mapping[str, str] = {},
        num_labels: Mapping[str, int] = {},
    ) -> None:
        """Add one sample; `stack` is leaf first, as profile.proto wants location_id[0].

        `labels` tag the sample (e.g. `thread`), `num_labels` with numbers (e.g. Go's `bytes`,
        the block size of a heap sample), for pprof's `-tags` and `-tagfocus`.
        """
        # A stack's ids are joined from each location's encoded id: deep stacks would otherwise
        # cost a Python varint loop per frame.
        encoded = self._encoded_ids
        location_ids = b"".join([encoded.get(f) or self._encoded_id(f) for f in stack])
        self.add_sample_ids(location_ids, values, labels, num_labels)

    def add_sample_ids(
        self,
        location_ids: bytes,
        values: Sequence[int],
        labels: Mapping[str, str] = {},
        num_labels: Mapping[str, int] = {},
    ) -> None:
        """Add one sample whose location ids, leaf first, are already encoded as varints."""
        writer = ProtoWriter()
        for value in values:
            writer.varint(value)
        self.add_sample_packed(
            location_ids, bytes(writer.data), self.label_fields(labels, num_labels)
        )

    def label_fields(self, labels: Mapping[str, str], num_labels: Mapping[str, int] = {}) -> bytes:
        """A sample's Label fields, encoded: the same for every sample with these labels, in
        this profile (they hold its string indexes)."""
        writer = ProtoWriter()
        for key, value in labels.items():
            key_index, value_index = self._string(key), self._string(value)
            writer.key(_SAMPLE_LABEL, LENGTH_DELIMITED)
            writer.varint(_label_size(key_index, value_index))
            writer.integer(_LABEL_KEY, key_index)
            writer.integer(_LABEL_STR, value_index)
        for key, number in num_labels.items():
            key_index = self._string(key)
            writer.key(_SAMPLE_LABEL, LENGTH_DELIMITED)
            writer.varint(_num_label_size(key_index, number))
            writer.integer(_LABEL_KEY, key_index)
            writer.integer(_LABEL_NUM, number)
        return bytes(writer.data)

    def add_sample_packed(self, location_ids: bytes, values: bytes, label_fields: bytes) -> None:
        """Add one sample from its parts, encoded: location ids and values as packed varints, and
        its Label fields (`label_fields`). Empty packed fields are not written. Joined as bytes:
        the sampler's profiles add thousands."""
        body = b"".join(
            (
                (_LOCATION_IDS_KEY + _length(len(location_ids)) + location_ids)
                if location_ids
                else b"",
                (_VALUES_KEY + _length(len(values)) + values) if values else b"",
                label_fields,
            )
        )
        self._samples.data += _SAMPLE_KEY + _length(len(body)) + body

    def encode(self) -> bytes:
        """The gzipped profile.proto bytes that `go tool pprof` reads."""
        strings = ProtoWriter()
        for value in self._strings:  # insertion order: the indexes
            strings.string(_PROFILE_STRING_TABLE, value)
        body = b"".join(
            (
                self._header.data,
                self._samples.data,
                self._locations.data,
                self._functions.data,
                strings.data,
                self._footer.data,
            )
        )
        return gzip.compress(body, compresslevel=1)


# The keys of a sample's fields, and the lengths that precede them, as bytes.
_SAMPLE_KEY = bytes([_PROFILE_SAMPLE << 3 | LENGTH_DELIMITED])
_LOCATION_IDS_KEY = bytes([_SAMPLE_LOCATION_ID << 3 | LENGTH_DELIMITED])
_VALUES_KEY = bytes([_SAMPLE_VALUE << 3 | LENGTH_DELIMITED])
_SHORT_LENGTHS = [bytes([n]) for n in range(128)]


def _length(size: int) -> bytes:
    if size < 128:
        return _SHORT_LENGTHS[size]
    writer = ProtoWriter()
    writer.varint(size)
    return bytes(writer.data)


def encode_location(location_id: int, function_id: int, line: int, address: int) -> bytes:
    """A Location message with one Line: the same bytes in every profile, so callers keep it."""
    line_message = ProtoWriter()
    line_message.integer(_LINE_FUNCTION_ID, function_id)
    line_message.integer(_LINE_LINE, line)
    location = ProtoWriter()
    location.integer(_LOCATION_ID, location_id)
    location.integer(_LOCATION_MAPPING_ID, _MAPPING_ID_PYTHON)
    location.integer(_LOCATION_ADDRESS, address)
    location.message(_LOCATION_LINE, line_message)
    return bytes(location.data)


def encode_varints(values: Iterable[int]) -> bytes:
    """Values as consecutive varints: a packed field's payload (a stack's location ids, a
    sample's values). In one C call where the sampler's extension is here."""
    if _c_varints is not None:
        return _c_varints(values if isinstance(values, list | tuple) else list(values))
    writer = ProtoWriter()
    for value in values:
        writer.varint(value)
    return bytes(writer.data)


try:
    from asgi_pprof._memprof import varints as _c_varints
except ImportError:  # not built, or an interpreter it does not support
    _c_varints = None


def _label_size(key_index: int, value_index: int) -> int:
    """The payload size of a Label with a key and a string value; index 0 ("") is not written."""
    return sum(1 + varint_size(index) for index in (key_index, value_index) if index)


def _num_label_size(key_index: int, number: int) -> int:
    """The payload size of a Label with a key and a number; zeros are not written."""
    return sum(1 + varint_size(value) for value in (key_index, number) if value)
