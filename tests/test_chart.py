"""The demo's charts: the terminal one puts points where they belong, the SVG one is valid SVG."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.chart import Series, nice_ticks, svg_chart, terminal_chart, value_at

SVG = "{http://www.w3.org/2000/svg}"


def plot_rows(chart: str, height: int) -> list[str]:
    """The plot area's rows, without the y labels: what follows the first '|' of each row."""
    rows = [line for line in chart.splitlines() if "|" in line]
    assert len(rows) == height
    return [row.split("|", 1)[1] for row in rows]


def test_value_at_interpolates_between_points_and_is_none_outside() -> None:
    points = [(0.0, 10.0), (10.0, 20.0), (20.0, 20.0)]
    assert value_at(points, 5.0) == 15.0
    assert value_at(points, 15.0) == 20.0
    assert value_at(points, 0.0) == 10.0
    assert value_at(points, 20.0) == 20.0
    assert value_at(points, -1.0) is None
    assert value_at(points, 21.0) is None
    assert value_at([(3.0, 7.0)], 3.0) == 7.0
    assert value_at([], 0.0) is None


def test_a_rising_line_goes_from_the_bottom_left_to_the_top_right() -> None:
    rising = Series("rising", [(0, 0), (100, 50)], "*", "red")
    rows = plot_rows(terminal_chart([rising], "x", "y", width=20, height=5), 5)
    assert rows[-1].startswith("*")  # lowest value: bottom row, first column
    assert rows[0].endswith("*") and len(rows[0]) == 20  # highest: top row, last column
    columns_by_row = [[i for i, cell in enumerate(row) if cell == "*"] for row in rows]
    # every column has exactly one mark, and higher rows hold later columns
    assert sorted(c for columns in columns_by_row for c in columns) == list(range(20))
    firsts = [columns[0] for columns in reversed(columns_by_row)]
    assert firsts == sorted(firsts)


def test_a_flat_line_and_a_rising_one_share_the_axes() -> None:
    flat = Series("fixed", [(0, 10.0), (50, 10.0), (100, 10.0)], "o", "blue")
    rising = Series("leaky", [(0, 10.0), (100, 20.0)], "*", "red")
    chart = terminal_chart([flat, rising], "requests served", "MiB", width=30, height=6)
    rows = plot_rows(chart, 6)
    # the flat line runs along the bottom; where the rising one is still as low, it covers it
    assert rows[-1] == "***" + "o" * 27
    assert rows[0].rstrip().endswith("*")
    assert "o fixed" in chart and "* leaky" in chart
    assert "requests served" in chart
    # y labels: the top and bottom of the range
    labels = [line.split("|")[0].strip() for line in chart.splitlines() if "|" in line]
    assert labels[0] == "20" and labels[-1] == "10"
    # x labels: the first and last requests
    axis_index = next(i for i, line in enumerate(chart.splitlines()) if "+---" in line)
    assert chart.splitlines()[axis_index + 1].split() == ["0", "50", "100"]


def test_a_single_flat_series_still_gets_a_range() -> None:
    chart = terminal_chart([Series("one", [(0, 5.0), (10, 5.0)], "o", "blue")], "x", "y", 10, 3)
    rows = plot_rows(chart, 3)
    assert rows[1] == "o" * 10  # drawn in the middle of a range made around it


def test_nothing_to_draw_is_an_error() -> None:
    with pytest.raises(ValueError):
        terminal_chart([Series("empty", [], "*", "red")], "x", "y")
    with pytest.raises(ValueError):
        terminal_chart([Series("one", [(0, 1)], "*", "red")], "x", "y", width=1)


@given(
    st.floats(-1e6, 1e6, allow_nan=False),  # memory in MiB and request counts, with room
    st.floats(1e-3, 1e6, allow_nan=False),
    st.integers(2, 10),
)
def test_nice_ticks_are_round_evenly_spaced_and_inside_the_range(
    low: float, span: float, count: int
) -> None:
    high = low + span
    ticks = nice_ticks(low, high, count)
    assert len(ticks) >= 2
    scale = max(abs(low), abs(high), span)
    assert all(low - 1e-9 * scale <= tick <= high + 1e-9 * scale for tick in ticks)
    steps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    step = steps[0]
    assert all(math.isclose(s, step, rel_tol=1e-6) for s in steps)
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 5, 10))
    assert len(ticks) <= 2 * count + 1


def test_nice_ticks_example() -> None:
    assert nice_ticks(0, 1894) == [0, 500, 1000, 1500]
    assert nice_ticks(56.8, 61.6, 6) == [57, 58, 59, 60, 61]


def test_svg_chart_is_svg_with_a_line_per_series_inside_the_plot() -> None:
    series = [
        Series("fixed <&>", [(0, 56.8), (1000, 56.9)], "o", "#1f77b4"),
        Series("leaky", [(0, 57.0), (500, 59.0), (1000, 61.6)], "*", "#d62728"),
    ]
    document = svg_chart(series, "Memory & requests", "requests served", "MiB", 720, 400)
    root = ElementTree.fromstring(document)
    assert root.tag == f"{SVG}svg"
    assert root.get("width") == "720" and root.get("height") == "400"
    assert root.find(f"{SVG}title").text == "Memory & requests"
    lines = root.findall(f"{SVG}polyline")
    assert [line.get("stroke") for line in lines] == ["#1f77b4", "#d62728"]
    for line, one in zip(lines, series, strict=True):
        points = [tuple(map(float, pair.split(","))) for pair in line.get("points").split()]
        assert len(points) == len(one.points)
        assert all(0 <= x <= 720 and 0 <= y <= 400 for x, y in points)
        xs = [x for x, _ in points]
        assert xs == sorted(xs)
    # the leaky line ends higher on the page (smaller y) than it starts
    leaky_points = lines[1].get("points").split()
    assert float(leaky_points[-1].split(",")[1]) < float(leaky_points[0].split(",")[1])
    texts = [text.text for text in root.iter(f"{SVG}text")]
    assert "fixed <&>" in texts and "requests served" in texts and "MiB" in texts


def test_x_labels_sit_at_round_values_under_their_columns() -> None:
    line = Series("leaky", [(0, 1.0), (1363, 2.0)], "*", "red")
    chart = terminal_chart([line], "requests served", "MiB", width=60, height=4)
    lines = chart.splitlines()
    axis = next(i for i, text in enumerate(lines) if "+---" in text)
    labels = lines[axis + 1]
    plot_start = lines[axis].index("+") + 1
    assert labels.split() == ["0", "500", "1000"]
    for value in (500, 1000):
        column = round(value / 1363 * 59)
        text = str(value)
        start = labels.index(text) - plot_start
        assert start <= column < start + len(text)
