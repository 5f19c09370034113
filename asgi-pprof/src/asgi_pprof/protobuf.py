"""A minimal protocol buffer writer, and the two reading primitives `reader` needs: just what
profile.proto needs, no dependencies.

Like Go's runtime/pprof/protobuf.go, fields are appended to one growing buffer. Profiles are built
while tracemalloc traces every allocation, and a traced allocation costs many times an untraced
one, so the writer allocates as little as it can: varints go straight into the buffer, and a nested
message's length is computed before its fields are written rather than by encoding it twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

VARINT = 0
LENGTH_DELIMITED = 2


def varint_size(value: int) -> int:
    """How many bytes `value` takes as a varint (negative int64s take ten)."""
    if value < 0:
        return 10
    return max(1, (value.bit_length() + 6) // 7)


def packed_size(values: Sequence[int]) -> int:
    return sum(map(varint_size, values))


def field_size(field: int, payload_size: int) -> int:
    """The size of a length-delimited field whose payload is `payload_size` bytes."""
    return varint_size(field << 3 | LENGTH_DELIMITED) + varint_size(payload_size) + payload_size


class ProtoWriter:
    def __init__(self) -> None:
        self.data = bytearray()

    def varint(self, value: int) -> None:
        if value < 0:
            value += 1 << 64  # int64 negatives travel as their two's complement
        data = self.data
        while value >= 0x80:
            data.append((value & 0x7F) | 0x80)
            value >>= 7
        data.append(value)

    def key(self, field: int, wire_type: int) -> None:
        self.varint(field << 3 | wire_type)

    def integer(self, field: int, value: int) -> None:
        """An int64, uint64 or bool field; zero is the default and is not written."""
        if value:
            self.key(field, VARINT)
            self.varint(value)

    def packed(self, field: int, values: Sequence[int], size: int | None = None) -> None:
        """A repeated integer field, packed (as proto3 does by default)."""
        if not values:
            return
        self.key(field, LENGTH_DELIMITED)
        self.varint(packed_size(values) if size is None else size)
        for value in values:
            self.varint(value)

    def bytes(self, field: int, value: bytes | bytearray) -> None:
        self.key(field, LENGTH_DELIMITED)
        self.varint(len(value))
        self.data += value

    def string(self, field: int, value: str) -> None:
        """Strings are always written: string_table[0] must be present even though it is empty."""
        self.bytes(field, value.encode("utf-8", "backslashreplace"))

    def message(self, field: int, message: ProtoWriter) -> None:
        self.bytes(field, message.data)


def read_varint(data: bytes, position: int) -> tuple[int, int]:
    """The varint at `position`, and the position after it."""
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def read_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a message: varints as int, the rest as bytes."""
    position = 0
    while position < len(data):
        key, position = read_varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = read_varint(data, position)
            yield number, value
        elif wire_type == 2:
            length, position = read_varint(data, position)
            yield number, data[position : position + length]
            position += length
        elif wire_type in (1, 5):  # fixed64, fixed32: profile.proto has none, skip them
            position += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
