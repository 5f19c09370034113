"""Decode pprof profiles independently of asgi_pprof, to check what it writes.

The message classes come from a FileDescriptorProto built here from the field numbers and types
of pprof's profile.proto, read by the `protobuf` runtime: nothing is shared with asgi_pprof's own
writer, so a mistake there cannot hide in a matching mistake here.
"""

from __future__ import annotations

import gzip
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "perftools.profiles"
_SCALAR_TYPES = {
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
}

# message -> (field name, number, type, repeated), as in profile.proto (proto3).
_MESSAGES: dict[str, list[tuple[str, int, str, bool]]] = {
    "Profile": [
        ("sample_type", 1, "ValueType", True),
        ("sample", 2, "Sample", True),
        ("mapping", 3, "Mapping", True),
        ("location", 4, "Location", True),
        ("function", 5, "Function", True),
        ("string_table", 6, "string", True),
        ("drop_frames", 7, "int64", False),
        ("keep_frames", 8, "int64", False),
        ("time_nanos", 9, "int64", False),
        ("duration_nanos", 10, "int64", False),
        ("period_type", 11, "ValueType", False),
        ("period", 12, "int64", False),
        ("comment", 13, "int64", True),
        ("default_sample_type", 14, "int64", False),
        ("doc_url", 15, "int64", False),
    ],
    "ValueType": [("type", 1, "int64", False), ("unit", 2, "int64", False)],
    "Sample": [
        ("location_id", 1, "uint64", True),
        ("value", 2, "int64", True),
        ("label", 3, "Label", True),
    ],
    "Label": [
        ("key", 1, "int64", False),
        ("str", 2, "int64", False),
        ("num", 3, "int64", False),
        ("num_unit", 4, "int64", False),
    ],
    "Mapping": [
        ("id", 1, "uint64", False),
        ("memory_start", 2, "uint64", False),
        ("memory_limit", 3, "uint64", False),
        ("file_offset", 4, "uint64", False),
        ("filename", 5, "int64", False),
        ("build_id", 6, "int64", False),
        ("has_functions", 7, "bool", False),
        ("has_filenames", 8, "bool", False),
        ("has_line_numbers", 9, "bool", False),
        ("has_inline_frames", 10, "bool", False),
    ],
    "Location": [
        ("id", 1, "uint64", False),
        ("mapping_id", 2, "uint64", False),
        ("address", 3, "uint64", False),
        ("line", 4, "Line", True),
        ("is_folded", 5, "bool", False),
    ],
    "Line": [
        ("function_id", 1, "uint64", False),
        ("line", 2, "int64", False),
        ("column", 3, "int64", False),
    ],
    "Function": [
        ("id", 1, "uint64", False),
        ("name", 2, "int64", False),
        ("system_name", 3, "int64", False),
        ("filename", 4, "int64", False),
        ("start_line", 5, "int64", False),
    ],
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="tests/pprof_profile.proto", package=_PACKAGE, syntax="proto3"
    )
    for message_name, fields in _MESSAGES.items():
        message = file.message_type.add(name=message_name)
        for field_name, number, type_name, repeated in fields:
            field = message.field.add(name=field_name, number=number)
            field.label = (
                descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
                if repeated
                else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
            )
            if type_name in _SCALAR_TYPES:
                field.type = _SCALAR_TYPES[type_name]
            else:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
                field.type_name = f".{_PACKAGE}.{type_name}"
    return file


_pool = descriptor_pool.DescriptorPool()  # private: never clashes with another profile.proto
_pool.Add(_file_descriptor())
Profile: Any = message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{_PACKAGE}.Profile"))


def decode(data: bytes) -> Any:
    """A Profile message from profile.proto bytes, gzipped (as served) or not."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    profile = Profile()
    profile.ParseFromString(data)
    return profile


@dataclass(frozen=True)
class Frame:
    function: str
    filename: str
    line: int
    start_line: int


@dataclass(frozen=True)
class Sample:
    frames: tuple[Frame, ...]  # leaf first, as profile.proto orders location_id
    values: dict[str, int]  # by sample type, e.g. {"inuse_objects": 3, "inuse_space": 240}
    labels: dict[str, str] = field(default_factory=dict)  # string labels, e.g. {"thread": ...}
    num_labels: dict[str, int] = field(default_factory=dict)  # e.g. {"bytes": 4096}


def samples(profile: Any) -> list[Sample]:
    """Every sample with its stack resolved to function names, files and lines."""
    strings = profile.string_table
    functions = {function.id: function for function in profile.function}
    locations = {location.id: location for location in profile.location}
    types = [strings[value_type.type] for value_type in profile.sample_type]
    resolved = []
    for sample in profile.sample:
        frames = []
        for location_id in sample.location_id:
            # Several lines in one location are inlined calls, innermost first.
            for line in locations[location_id].line:
                function = functions[line.function_id]
                frames.append(
                    Frame(
                        strings[function.name],
                        strings[function.filename],
                        line.line,
                        function.start_line,
                    )
                )
        words = {strings[label.key]: strings[label.str] for label in sample.label if label.str}
        numbers = {strings[label.key]: label.num for label in sample.label if not label.str}
        values = dict(zip(types, sample.value, strict=True))
        resolved.append(Sample(tuple(frames), values, words, numbers))
    return resolved


def invariant_violations(profile: Any) -> list[str]:
    """What breaks the rules written in profile.proto's comments (an empty list if nothing)."""
    problems: list[str] = []
    strings = profile.string_table
    if not strings or strings[0] != "":
        problems.append('string_table[0] must be ""')
    duplicated = [s for s, n in Counter(strings).items() if n > 1]
    if duplicated:
        problems.append(f"string_table repeats {duplicated[:5]}")

    def check_index(where: str, index: int) -> None:
        if not 0 <= index < len(strings):
            problems.append(f"{where}: string index {index} out of range")

    for value_type in [*profile.sample_type, profile.period_type]:
        check_index("value type", value_type.type)
        check_index("value type", value_type.unit)
    for index in [*profile.comment, profile.default_sample_type, profile.doc_url]:
        check_index("profile", index)
    check_index("drop_frames", profile.drop_frames)
    check_index("keep_frames", profile.keep_frames)

    mapping_ids = [mapping.id for mapping in profile.mapping]
    location_ids = [location.id for location in profile.location]
    function_ids = [function.id for function in profile.function]
    for kind, ids in (("mapping", mapping_ids), ("location", location_ids)):
        if 0 in ids or len(set(ids)) != len(ids):
            problems.append(f"{kind} ids must be unique and non-zero: {ids[:20]}")
    if 0 in function_ids or len(set(function_ids)) != len(function_ids):
        problems.append("function ids must be unique and non-zero")
    for mapping in profile.mapping:
        check_index("mapping filename", mapping.filename)
        check_index("mapping build_id", mapping.build_id)

    functions = {function.id: function for function in profile.function}
    for function in profile.function:
        for index in (function.name, function.system_name, function.filename):
            check_index(f"function {function.id}", index)
        if function.name < len(strings) and not strings[function.name]:
            problems.append(f"function {function.id} has no name")
    function_keys = Counter(
        (f.name, f.system_name, f.filename, f.start_line) for f in profile.function
    )
    if any(n > 1 for n in function_keys.values()):
        problems.append("functions are not deduplicated")

    for location in profile.location:
        if location.mapping_id and location.mapping_id not in mapping_ids:
            problems.append(f"location {location.id}: no mapping {location.mapping_id}")
        if not location.line:
            problems.append(f"location {location.id} has no line")
        for line in location.line:
            function = functions.get(line.function_id)
            if function is None:
                problems.append(f"location {location.id}: no function {line.function_id}")
            elif function.start_line > line.line:
                problems.append(
                    f"location {location.id}: line {line.line} is before its function's "
                    f"start_line {function.start_line}"
                )
    location_keys = Counter(
        (loc.mapping_id, loc.address, tuple((ln.function_id, ln.line) for ln in loc.line))
        for loc in profile.location
    )
    if any(n > 1 for n in location_keys.values()):
        problems.append("locations are not deduplicated")

    known_locations = set(location_ids)
    for number, sample in enumerate(profile.sample):
        if len(sample.value) != len(profile.sample_type):
            problems.append(f"sample {number} has {len(sample.value)} values")
        missing = [i for i in sample.location_id if i not in known_locations]
        if missing:
            problems.append(f"sample {number} refers to missing locations {missing}")
        for label in sample.label:
            for index in (label.key, label.str, label.num_unit):
                check_index(f"sample {number} label", index)
    return problems
