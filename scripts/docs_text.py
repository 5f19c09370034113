"""What make_docs.py does to the outputs it pastes into the tutorial, apart from running them:
pprof's SVG made into a picture a code host can show, and Go's heap header read field by field."""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PPROF_TIME = re.compile(r"Time: [A-Z][a-z]{2} \d+, \d{4} at [0-9:apm]+ \(\w+\)")
MAX_SVG_WIDTH = 1200  # px: wider than a code host's column, so it is scaled down, not cropped

_SVG_TAG = re.compile(r"<svg\b[^>]*>")
_SCRIPT = re.compile(r"<script\b.*?</script>", re.DOTALL)
_VIEWPORT = re.compile(r'<g id="viewport" transform="[^"]*">')
# graphviz draws the graph's white background first: its corners are the graph's extent.
_BACKGROUND = re.compile(
    r'<g id="graph0"[^>]*>\s*<title>[^<]*</title>\s*<polygon [^>]*points="([^"]+)"'
)
_HEAP_HEADER = re.compile(
    r"^heap profile: (\d+): (\d+) \[(\d+): (\d+)\] @ (heap(?:_v2)?)/(\d+)$", re.MULTILINE
)


class SvgError(Exception):
    """pprof's SVG is not laid out as this module expects: the picture cannot be sized."""


def readable_svg(svg: str, max_width: float = MAX_SVG_WIDTH) -> str:
    """pprof's `-svg` output as a picture that renders as an image.

    pprof writes `width="100%" height="100%"`, no viewBox, a 0.5 scale and a pan-and-zoom script
    for a browser window: in an <img>, as code hosts show SVG, that draws a 300x150 crop. Here the
    script goes (images run none), the scale goes, the viewBox is the graph's extent and the size
    its own, scaled down to `max_width` if wider.
    """
    background = _BACKGROUND.search(svg)
    if background is None:
        raise SvgError("no graph background polygon in pprof's SVG")
    corners = [tuple(map(float, point.split(","))) for point in background.group(1).split()]
    xs, ys = [x for x, _ in corners], [y for _, y in corners]
    width, height = max(xs) - min(xs), max(ys) - min(ys)
    if width <= 0 or height <= 0:
        raise SvgError(f"the graph's extent is {width} x {height}")
    scale = min(1.0, max_width / width)
    tag = _SVG_TAG.search(svg)
    if tag is None:
        raise SvgError("no <svg> element")
    sized = (
        f'<svg width="{width * scale:.0f}" height="{height * scale:.0f}" '
        f'viewBox="0 0 {width:g} {height:g}" xmlns="http://www.w3.org/2000/svg" '
        'xmlns:xlink="http://www.w3.org/1999/xlink">'
    )
    svg = svg[: tag.start()] + sized + svg[tag.end() :]
    svg = _SCRIPT.sub("", svg, count=1)
    return _VIEWPORT.sub('<g id="viewport">', svg, count=1)


def svg_size(svg: str) -> tuple[float, float, list[float]]:
    """The root element's width, height (px; ValueError unless plain numbers) and viewBox."""
    tag = _SVG_TAG.search(svg)
    if tag is None:
        raise ValueError("no <svg> element")
    attributes = dict(re.findall(r'([\w:-]+)="([^"]*)"', tag.group(0)))
    view_box = [float(number) for number in attributes.get("viewBox", "").split()]
    return float(attributes["width"]), float(attributes["height"]), view_box


def heap_header(text: str) -> dict[str, int | str]:
    """The fields of a debug=1 heap profile's first line, as the tutorial explains them."""
    found = _HEAP_HEADER.search(text)
    if found is None:
        raise ValueError("no `heap profile: ...` header line")
    inuse_objects, inuse_bytes, alloc_objects, alloc_bytes, kind, rate2 = found.groups()
    return {
        "line": found.group(0),
        "inuse_objects": int(inuse_objects),
        "inuse_bytes": int(inuse_bytes),
        "alloc_objects": int(alloc_objects),
        "alloc_bytes": int(alloc_bytes),
        "kind": kind,
        "twice_rate": int(rate2),
    }


def row_of(top: str, needle: str) -> int:
    """The 1-based row of the first `pprof -top` entry containing `needle`."""
    rows = top[top.index("flat  flat%") :].splitlines()[1:]
    return next(number for number, row in enumerate(rows, 1) if needle in row)


def heap_text_excerpt(text: str) -> str:
    """The header and first record, then the python.MemStats footer, of a debug=1 heap profile."""
    first_record = text.split("\n\n")[0]
    return f"{first_record}\n\n...\n\n{text[text.index('# python.MemStats') :]}"


def source_excerpt(path: Path, first: str, last: str) -> str:
    """Lines of `path`, numbered, from the first one containing `first` to the next with `last`."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    end = next(i for i in range(start, len(lines)) if last in lines[i])
    return "\n".join(f"{i + 1:4d}  {lines[i]}" for i in range(start, end + 1))


class Normalise:
    """Replaces what differs between machines and runs in an output: paths and times."""

    def __init__(self, renames: dict[Path, str]) -> None:
        paths = sysconfig.get_paths()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        replacements = {
            paths["purelib"]: ".../site-packages",
            paths["stdlib"]: f".../lib/python{version}",
            str(ROOT): "...",
            **{str(path): name for path, name in renames.items()},
        }
        # longest first: site-packages lies inside the project's .venv, temporary files in /tmp
        self.replacements = sorted(replacements.items(), key=lambda item: -len(item[0]))

    def __call__(self, text: str) -> str:
        for path, replacement in self.replacements:
            text = text.replace(path, replacement)
        return PPROF_TIME.sub("Time: (removed)", text)
