"""A minimal protocol buffer writer: just what profile.proto needs, no dependencies.

Like Go's runtime/pprof/protobuf.go: fields are appended to one bytearray; a nested message is
written into a fresh writer and then copied in with its length in front.
"""

from __future__ import annotations

from collections.abc import Iterable

_VARINT = 0
_LENGTH_DELIMITED = 2


class ProtoWriter:
    def __init__(self) -> None:
        self.data = bytearray()

    def _varint(self, value: int) -> None:
        if value < 0:
            value += 1 << 64  # int64 negatives travel as their two's complement
        data = self.data
        while value >= 0x80:
            data.append((value & 0x7F) | 0x80)
            value >>= 7
        data.append(value)

    def _key(self, field: int, wire_type: int) -> None:
        self._varint(field << 3 | wire_type)

    def integer(self, field: int, value: int) -> None:
        """An int64, uint64 or bool field; zero is the default and is not written."""
        if value:
            self._key(field, _VARINT)
            self._varint(value)

    def integers(self, field: int, values: Iterable[int]) -> None:
        """A repeated integer field, packed (as proto3 does by default)."""
        packed = ProtoWriter()
        for value in values:
            packed._varint(value)
        if packed.data:
            self.bytes(field, packed.data)

    def bytes(self, field: int, value: bytes | bytearray) -> None:
        self._key(field, _LENGTH_DELIMITED)
        self._varint(len(value))
        self.data += value

    def string(self, field: int, value: str) -> None:
        """Strings are always written: string_table[0] must be present even though it is empty."""
        self.bytes(field, value.encode("utf-8", "backslashreplace"))

    def message(self, field: int, message: ProtoWriter) -> None:
        self.bytes(field, message.data)
