"""What the tutorial and the prose around it show a reader: pictures that render as images on a
code host, and statements that match what the code and its dependencies really do."""

from __future__ import annotations

import json
import re
import subprocess
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.metrics import _internal as otel_metrics

from asgi_pprof import heap
from scripts.docs_text import MAX_SVG_WIDTH, heap_header, readable_svg, svg_size

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "docs" / "generated"
NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight"]
# The proxy instruments' classes, as prose names them (singular, plural).
KINDS = {
    "_ProxyHistogram": ("histogram", "histograms"),
    "_ProxyUpDownCounter": ("up-down counter", "up-down counters"),
    "_ProxyCounter": ("counter", "counters"),
    "_ProxyGauge": ("gauge", "gauges"),
}


def assert_renders_as_an_image(svg: str, name: str) -> None:
    """What an <img> needs to draw the whole picture: a viewBox, and a size in pixels."""
    tag = re.search(r"<svg\b[^>]*>", svg)
    assert tag is not None, name
    assert "%" not in tag.group(0), f"{name}: a size in percent draws a 300x150 crop"
    width, height, view_box = svg_size(svg)
    assert len(view_box) == 4 and view_box[2] > 0 and view_box[3] > 0, f"{name}: no viewBox"
    assert 100 <= width <= MAX_SVG_WIDTH, f"{name}: {width:.0f} px wide"
    # the size keeps the viewBox's shape: nothing is squeezed or cropped
    assert width / height == pytest.approx(view_box[2] / view_box[3], rel=0.01), name


def test_every_generated_svg_renders_as_an_image() -> None:
    pictures = sorted(GENERATED.glob("*.svg"))
    assert {path.name for path in pictures} >= {"leaky-heap.svg", "leaky-heap-focus.svg"}
    for path in pictures:
        assert_renders_as_an_image(path.read_text(), path.name)


def test_readable_svg_sizes_pprofs_own_output_to_its_graph(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    require_tool("dot")
    tracemalloc.start(4)
    try:
        kept = [bytearray(1000) for _ in range(200)]
        profile = heap.capture()
    finally:
        tracemalloc.stop()
    del kept
    (tmp_path / "heap.pb.gz").write_bytes(heap.encode(profile))
    raw = subprocess.run(
        [go, "tool", "pprof", "-svg", "heap.pb.gz"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    raw_tag = re.search(r"<svg\b[^>]*>", raw)
    assert raw_tag is not None
    assert 'width="100%"' in raw_tag.group(0) and "viewBox" not in raw_tag.group(0)  # pprof's
    svg = readable_svg(raw)
    assert_renders_as_an_image(svg, "pprof -svg")
    assert "<script" not in svg and "scale(0.5,0.5)" not in svg
    # the viewBox is the graph's own extent: graphviz's translate(4 H-4) puts its bottom at H
    translate = re.search(r'id="graph0"[^>]*translate\(([\d.]+) ([\d.]+)\)', svg)
    assert translate is not None
    _, _, view_box = svg_size(svg)
    assert view_box[3] == pytest.approx(float(translate.group(2)) + float(translate.group(1)))
    narrow = readable_svg(raw, max_width=view_box[2] / 2)
    assert svg_size(narrow)[0] == pytest.approx(view_box[2] / 2, abs=1)


def instruments_one_middleware_creates() -> tuple[int, Counter[str]]:
    """Meters and instruments that building the middleware adds to the global proxy meter
    provider, as the leaky service builds it: no meter provider set."""
    provider = otel_metrics._PROXY_METER_PROVIDER
    assert otel_metrics.get_meter_provider() is provider, "a test set a real meter provider"
    before = len(provider._meters)

    async def app(scope: object, receive: object, send: object) -> None:
        pass

    OpenTelemetryMiddleware(app)
    meters = provider._meters[before:]
    return len(meters), Counter(type(i).__name__ for meter in meters for i in meter._instruments)


def in_words(count: int, kind: str) -> str:
    singular, plural = KINDS[kind]
    return f"{NUMBERS[count]} {singular if count == 1 else plural}"


def test_main_py_and_branches_md_name_the_instruments_the_middleware_creates() -> None:
    meters, kinds = instruments_one_middleware_creates()
    assert meters == 1
    assert set(kinds) <= set(KINDS), f"instruments the prose has no name for: {kinds}"
    docstring = " ".join((ROOT / "app" / "main.py").read_text().split('"""')[1].split())
    branches = " ".join((ROOT / "branches.md").read_text().split())
    assert "adds a meter, " in docstring
    for kind, count in kinds.items():
        assert in_words(count, kind) in docstring, in_words(count, kind)
        assert in_words(count, kind) in branches, in_words(count, kind)
    assert f"{NUMBERS[sum(kinds.values())]} proxy instruments" in branches


def test_the_sampled_header_is_gos_and_the_tutorial_reads_it_field_by_field() -> None:
    values = json.loads((GENERATED / "values.json").read_text())
    line = (GENERATED / "sampled-heap-header.txt").read_text().strip()
    header = heap_header(line)
    # Go writes twice its sampling rate after `heap/`: the blog's heap/1048576 is 512 KiB
    assert header["kind"] == "heap"
    assert header["twice_rate"] == 2 * values["sampled_rate"]
    assert header["alloc_bytes"] >= header["inuse_bytes"] > 0
    tutorial = (ROOT / "docs" / "tutorial.md").read_text()
    assert line in tutorial
    fields = [
        f"`{header['inuse_objects']}`",
        f"`{header['inuse_bytes']}`",
        f"`[{header['alloc_objects']}: {header['alloc_bytes']}]`",
        f"`@ heap/{header['twice_rate']}`",
    ]
    for field in fields:  # each explained in a list item of its own
        assert f"\n- {field}" in tutorial, field


def test_the_tutorial_names_settings_that_exist() -> None:
    tutorial = (ROOT / "docs" / "tutorial.md").read_text()
    settings = (ROOT / "app" / "settings.py").read_text()
    named = set(re.findall(r"\b((?:PPROF|OTEL|LEAK|LEAKER)_[A-Z_]+)=?", tutorial))
    assert {
        "PPROF_TRACEMALLOC_FRAMES",
        "PPROF_HEAP_PROFILER",
        "OTEL_EXPORTER_ZIPKIN_ENDPOINT",
    } <= named
    compose = (ROOT / "docker-compose.yml").read_text()
    library = "".join(path.read_text() for path in (ROOT / "asgi-pprof" / "src").rglob("*.py"))
    for name in named:
        assert f'"{name}"' in settings + library or name in compose, name


def top_rows(path: Path) -> list[str]:
    text = path.read_text()
    return text[text.index("flat  flat%") :].splitlines()[1:]


def test_what_the_tutorial_says_of_pprofs_outputs_is_what_they_show() -> None:
    tutorial = (ROOT / "docs" / "tutorial.md").read_text()
    # "sorted by `cum` instead (`-cum`), that line comes first"
    assert (
        "app.main.OpenTelemetryPerRequest.__call__"
        in top_rows(GENERATED / "pprof-focus-lines-cum.txt")[0]
    )
    assert "that line comes first" in tutorial
    # over HTTP, pprof names the debug=1 text's addresses through /debug/pprof/symbol
    rows = top_rows(GENERATED / "pprof-debug1-http.txt")
    assert rows and all(re.search(r"\s[a-z_]+\.\S+$", row) for row in rows), rows
    assert not any("<unknown>" in row or re.search(r"\s0x[0-9a-f]+$", row) for row in rows)
    assert "/debug/pprof/symbol" in tutorial


def test_both_heap_profilers_name_the_leak_among_their_first_rows() -> None:
    for name in ("pprof-top-exact.txt", "pprof-top-sampled.txt"):
        rows = "\n".join(top_rows(GENERATED / name)[:10])
        for function in ("_ProxyMeter.create_histogram", "_ProxyMeterProvider.get_meter"):
            assert function in rows, (name, function)


LEAK_MARK = "# the leak"  # the comment on each leaking line of app/main.py
# `app/main.py:43`, `.../app/main.py:43`, or "`app/main.py`, line 43" as the tutorial says it.
MAIN_PY_LINE = re.compile(r"app/main\.py(?::|`?, line )(\d+)")


def test_every_line_of_main_py_the_docs_cite_is_a_leaking_line() -> None:
    lines = (ROOT / "app" / "main.py").read_text().splitlines()
    leaking = {number for number, line in enumerate(lines, 1) if line.endswith(LEAK_MARK)}
    assert leaking, f"no line of app/main.py ends with {LEAK_MARK!r}"
    documents = ["README.md", "branches.md", "docs/tutorial.template.md", "docs/tutorial.md"]
    cited = {
        (document, int(number))
        for document in documents
        for number in MAIN_PY_LINE.findall((ROOT / document).read_text())
    }
    assert {document for document, _ in cited} >= {"README.md", "branches.md", "docs/tutorial.md"}
    wrong = sorted((document, number) for document, number in cited if number not in leaking)
    assert wrong == [], f"cited lines of app/main.py that are not {sorted(leaking)}"


def test_the_labels_step_shows_the_second_leak_under_one_route_only() -> None:
    tutorial = (ROOT / "docs" / "tutorial.md").read_text()
    # "all of it came from one route"
    tags = (GENERATED / "routes-tags.txt").read_text()
    shares = {route: share for share, route in re.findall(r"\(\s*([\d.]+)%\): (\S+)", tags)}
    assert float(shares["/orders/{order_id}"]) > 90, tags
    assert "all of it came from one route" in tutorial
    # "Nothing of the second leak is left under `/`"
    assert (
        "Showing nodes accounting for 0, 0% of"
        in (GENERATED / "routes-tagfocus-root.txt").read_text()
    )
    # "under `/orders/`, both leaks"
    rows = "\n".join(top_rows(GENERATED / "routes-tagfocus.txt"))
    assert "_ProxyMeter" in rows and "Headers" in rows, rows
    assert "remember_visit" in (GENERATED / "routes-focus.txt").read_text()
