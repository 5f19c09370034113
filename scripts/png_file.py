"""Reading and tagging PNG files in pure Python: chunks, tEXt, pixels, and whether one is blank.

Enough of the PNG format (https://www.w3.org/TR/png/) for what chromium writes: 8-bit RGB or RGBA,
not interlaced. scripts/screenshots.py tags its screenshots and refuses blank ones with it;
tests/test_docs_images.py checks the committed ones with it.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SHARE_OF_ONE_COLOUR = 0.98
MIN_COLOURS = 32  # a page of anti-aliased text alone has dozens


def chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """A PNG's chunks, as (type, data)."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    offset = len(PNG_SIGNATURE)
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        yield kind, data[offset + 8 : offset + 8 + length]
        offset += 12 + length  # length, type, data, CRC


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def tag(png: Path, keyword: str, text: str) -> None:
    """Adds a tEXt chunk `keyword`: `text` to the file `png`, just before IEND."""
    data = png.read_bytes()
    end = data.rindex(b"IEND") - 4  # the IEND chunk starts with its length
    body = keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    png.write_bytes(data[:end] + chunk(b"tEXt", body) + data[end:])


def texts(data: bytes) -> dict[str, str]:
    """A PNG's tEXt chunks, keyword to text."""
    found = {}
    for kind, body in chunks(data):
        if kind == b"tEXt":
            keyword, _, text = body.partition(b"\0")
            found[keyword.decode("latin-1")] = text.decode("latin-1")
    return found


def pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of pixels (filters undone) of an 8-bit RGB or RGBA PNG, as
    chromium writes them."""
    found = dict(chunks(data))  # the last of each kind; IDAT is gathered below
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", found[b"IHDR"])
    if depth != 8 or colour_type not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour_type}")
    step = 3 if colour_type == 2 else 4  # bytes per pixel
    raw = zlib.decompress(b"".join(body for kind, body in chunks(data) if kind == b"IDAT"))
    stride = width * step
    rows: list[bytes] = []
    previous = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        row = unfilter(raw[start], raw[start + 1 : start + 1 + stride], previous, step)
        rows.append(row)
        previous = row
    return width, height, rows


def unfilter(kind: int, line: bytes, above: bytes, step: int) -> bytes:
    """One row with PNG filter `kind` undone (PNG spec, section 9)."""
    if kind == 0:
        return line
    if kind == 2:
        return bytes((a + b) & 0xFF for a, b in zip(line, above, strict=True))
    out = bytearray(line)
    for i in range(len(out)):
        left = out[i - step] if i >= step else 0
        if kind == 1:
            out[i] = (out[i] + left) & 0xFF
        elif kind == 3:
            out[i] = (out[i] + ((left + above[i]) >> 1)) & 0xFF
        elif kind == 4:
            corner = above[i - step] if i >= step else 0
            out[i] = (out[i] + paeth(left, above[i], corner)) & 0xFF
        else:
            raise ValueError(f"unknown PNG filter {kind}")
    return bytes(out)


def paeth(left: int, above: int, corner: int) -> int:
    estimate = left + above - corner
    to_left, to_above, to_corner = (
        abs(estimate - left),
        abs(estimate - above),
        abs(estimate - corner),
    )
    if to_left <= to_above and to_left <= to_corner:
        return left
    return above if to_above <= to_corner else corner


def colour_spread(data: bytes) -> tuple[float, int]:
    """The share of the pixels that have the commonest colour, and how many colours there are."""
    width, height, rows = pixels(data)
    step = len(rows[0]) // width
    counts = Counter(row[x : x + step] for row in rows for x in range(0, len(row), step))
    return counts.most_common(1)[0][1] / (width * height), len(counts)


def blankness(data: bytes) -> str:
    """Why the PNG looks blank (one colour nearly everywhere, or few colours); empty if not."""
    share, colours = colour_spread(data)
    if share > MAX_SHARE_OF_ONE_COLOUR or colours < MIN_COLOURS:
        return f"{colours} colours, one of them on {share:.1%} of the pixels"
    return ""
