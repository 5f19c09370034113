"""Line charts with nothing but the standard library: one for the terminal, one as an SVG file.

Both draw the same thing: a few series of (x, y) points, each joined into a line, on shared axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

Point = tuple[float, float]


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[Point]  # in increasing x
    marker: str  # the terminal chart's character for this series
    color: str  # the SVG line's colour


@dataclass(frozen=True)
class _Bounds:
    x_low: float
    x_high: float
    y_low: float
    y_high: float


def _bounds(series: Sequence[Series]) -> _Bounds:
    points = [point for one in series for point in one.points]
    if not points:
        raise ValueError("nothing to draw: every series is empty")
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    if x_high == x_low:  # one x: widen, so that the point sits on a real axis
        x_high = x_low + 1
    if y_high == y_low:  # a flat line: give it room above and below
        margin = abs(y_low) * 0.05 or 1.0
        y_low, y_high = y_low - margin, y_high + margin
    return _Bounds(x_low, x_high, y_low, y_high)


def value_at(points: Sequence[Point], x: float) -> float | None:
    """The series' y at `x`, on the straight line between its neighbouring points; None outside."""
    if not points or x < points[0][0] or x > points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1]  # a single point


def terminal_chart(
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    width: int = 60,
    height: int = 12,
    y_format: Callable[[float], str] = "{:g}".format,
) -> str:
    """A chart in plain ASCII: `width` columns by `height` rows of plot, axes and a legend.

    Each column shows every series' value at that column's x; a later series draws over an
    earlier one where they share a cell.
    """
    if width < 2 or height < 2:
        raise ValueError(f"a chart needs at least 2 x 2 cells, not {width} x {height}")
    bounds = _bounds(series)
    grid = [[" "] * width for _ in range(height)]
    for one in series:
        for column in range(width):
            x = bounds.x_low + (bounds.x_high - bounds.x_low) * column / (width - 1)
            y = value_at(one.points, x)
            if y is None:
                continue
            fraction = (y - bounds.y_low) / (bounds.y_high - bounds.y_low)
            row = height - 1 - round(fraction * (height - 1))
            grid[row][column] = one.marker

    # y labels on the top, middle and bottom rows
    labels = {
        0: y_format(bounds.y_high),
        (height - 1) // 2: y_format((bounds.y_low + bounds.y_high) / 2),
        height - 1: y_format(bounds.y_low),
    }
    label_width = max(len(label) for label in labels.values())
    lines = [" " * label_width + "  " + y_label]
    for row, cells in enumerate(grid):
        lines.append(f"{labels.get(row, ''):>{label_width}} |{''.join(cells).rstrip()}")
    lines.append(" " * label_width + " +" + "-" * width)

    ticks = [" "] * (width + 10)
    free_from = 0  # the first column a label may use without touching the one before
    for x in nice_ticks(bounds.x_low, bounds.x_high, 4):
        text = f"{x:g}"
        column = round((x - bounds.x_low) / (bounds.x_high - bounds.x_low) * (width - 1))
        start = min(max(column - len(text) // 2, 0), width - len(text))
        if start >= free_from:
            ticks[start : start + len(text)] = text
            free_from = start + len(text) + 1
    lines.append(" " * (label_width + 2) + "".join(ticks).rstrip())
    lines.append(" " * (label_width + 2) + x_label.center(width).rstrip())
    legend = "   ".join(f"{one.marker} {one.name}" for one in series)
    lines.append(" " * (label_width + 2) + legend)
    return "\n".join(lines) + "\n"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) from `low` to `high`: about `count`
    of them, and at least two."""
    if high <= low:
        return [low]
    raw_step = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw_step))
    steps = [m * magnitude for m in (10, 5, 2, 1, 0.5, 0.2, 0.1)]  # largest first
    preferred = min(step for step in steps if step >= raw_step)
    ticks: list[float] = []
    for step in steps[steps.index(preferred) :]:  # smaller steps if the range holds too few
        first = math.ceil(low / step - 1e-9)
        last = math.floor(high / step + 1e-9)
        ticks = [round(k * step, 12) for k in range(first, last + 1)]
        if len(ticks) >= 2:
            break
    return ticks


def svg_chart(
    series: Sequence[Series],
    title: str,
    x_label: str,
    y_label: str,
    width: int = 720,
    height: int = 400,
    y_format: Callable[[float], str] = "{:g}".format,
) -> str:
    """A standalone SVG document: axes with round ticks, one polyline per series, a legend."""
    bounds = _bounds(series)
    left, right, top, bottom = 70, 20, 40, 60  # margins around the plot area
    plot_width, plot_height = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - bounds.x_low) / (bounds.x_high - bounds.x_low) * plot_width

    def py(y: float) -> float:
        return top + (bounds.y_high - y) / (bounds.y_high - bounds.y_low) * plot_height

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:g}" y="22" text-anchor="middle" font-size="15">'
        f"{escape(title)}</text>",
    ]
    for x in nice_ticks(bounds.x_low, bounds.x_high, 6):
        parts.append(
            f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{top + plot_height}" '
            'stroke="#e5e5e5"/>'
        )
        parts.append(
            f'<text x="{px(x):.1f}" y="{top + plot_height + 16}" text-anchor="middle">'
            f"{escape(f'{x:g}')}</text>"
        )
    for y in nice_ticks(bounds.y_low, bounds.y_high, 6):
        parts.append(
            f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + plot_width}" y2="{py(y):.1f}" '
            'stroke="#e5e5e5"/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">'
            f"{escape(y_format(y))}</text>"
        )
    parts.append(
        f'<rect x="{left}" y="{top}" width="{plot_width}" height="{plot_height}" '
        'fill="none" stroke="#333"/>'
    )
    parts.append(
        f'<text x="{left + plot_width / 2:g}" y="{height - 28}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    parts.append(
        f'<text transform="translate(16 {top + plot_height / 2:g}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    for one in series:
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in one.points)
        parts.append(
            f'<polyline fill="none" stroke={quoteattr(one.color)} stroke-width="2" '
            f'points="{points}"/>'
        )
    legend_x = left
    for one in series:  # the legend, in a row under the x label
        parts.append(
            f'<line x1="{legend_x}" y1="{height - 10}" x2="{legend_x + 24}" y2="{height - 10}" '
            f'stroke={quoteattr(one.color)} stroke-width="3"/>'
        )
        parts.append(f'<text x="{legend_x + 30}" y="{height - 6}">{escape(one.name)}</text>')
        legend_x += 40 + 7 * len(one.name)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
