"""The tutorial's screenshots (scripts/screenshots.py): fresh, readable as PNG, not blank.

"Fresh" means from the same `make docs` run as the rest of docs/generated/: each PNG carries the
run's id in a tEXt chunk, and values.json holds it as `screenshots_run`.
"""

from __future__ import annotations

import inspect
import json
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry.metrics._internal import _ProxyMeter

from asgi_pprof.profile import ProfileBuilder
from scripts import make_docs, png_file, screenshots

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def tutorial_pngs() -> list[str]:
    """The PNGs under generated/ that docs/tutorial.template.md shows."""
    links = make_docs.GENERATED_LINK.findall((DOCS / "tutorial.template.md").read_text())
    return sorted(link.removeprefix("generated/") for link in links if link.endswith(".png"))


def test_every_screenshot_the_tutorial_shows_is_from_the_last_run_and_not_blank() -> None:
    shown = tutorial_pngs()
    assert shown, "the tutorial shows no screenshot"
    generated = DOCS / "generated"
    # and nothing left over from an earlier run that no page shows
    assert sorted(path.name for path in generated.glob("*.png")) == shown
    run = json.loads((generated / "values.json").read_text())["screenshots_run"]
    for name in shown:
        data = (generated / name).read_bytes()
        assert png_file.texts(data).get(screenshots.RUN_KEYWORD) == run, f"{name}: run `make docs`"
        assert png_file.blankness(data) == "", name


# --- The PNG reader, on images made here ---


def encode_png(rows: list[bytes], width: int, filters: list[int]) -> bytes:
    """An 8-bit RGB PNG of `rows`, row y written with filter type filters[y] (PNG spec 9.2)."""
    raw = bytearray()
    above = bytes(len(rows[0]))
    for row, kind in zip(rows, filters, strict=True):
        raw.append(kind)
        for i, value in enumerate(row):
            left = row[i - 3] if i >= 3 else 0
            corner = above[i - 3] if i >= 3 else 0
            predicted = {
                0: 0,
                1: left,
                2: above[i],
                3: (left + above[i]) // 2,
                4: png_file.paeth(left, above[i], corner),
            }[kind]
            raw.append((value - predicted) & 0xFF)
        above = row
    header = struct.pack(">IIBBBBB", width, len(rows), 8, 2, 0, 0, 0)
    return (
        png_file.PNG_SIGNATURE
        + png_file.chunk(b"IHDR", header)
        + png_file.chunk(b"IDAT", zlib.compress(bytes(raw)))
        + png_file.chunk(b"IEND", b"")
    )


def test_pixels_undoes_every_png_filter() -> None:
    width, height = 7, 10
    generator = random.Random(12)
    rows = [bytes(generator.randrange(256) for _ in range(width * 3)) for _ in range(height)]
    data = encode_png(rows, width, [y % 5 for y in range(height)])
    assert png_file.pixels(data) == (width, height, rows)


def test_blankness_tells_a_blank_image_from_a_busy_one() -> None:
    width = 40
    white = [bytes([255] * width * 3)] * 30
    assert "1 colours" in png_file.blankness(encode_png(white, width, [0] * 30))
    generator = random.Random(3)
    busy = [bytes(generator.randrange(256) for _ in range(width * 3)) for _ in range(30)]
    assert png_file.blankness(encode_png(busy, width, [4] * 30)) == ""


def test_tag_adds_a_text_chunk_that_texts_reads(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(encode_png([bytes(6)] * 2, 2, [0, 0]))
    png_file.tag(path, "leaker-docs-run", "0123abcd")
    data = path.read_bytes()
    assert png_file.texts(data) == {"leaker-docs-run": "0123abcd"}
    assert [kind for kind, _ in png_file.chunks(data)] == [b"IHDR", b"IDAT", b"tEXt", b"IEND"]
    assert png_file.pixels(data)[2] == [bytes(6)] * 2  # the image itself is untouched


# --- The screenshots themselves, in the real browser ---


def small_leak_profile(path: Path) -> None:
    """A heap profile of two stacks, both through the leaking line of app/main.py, from real
    source lines (pprof's source view reads them)."""
    main_py = str(ROOT / "app" / "main.py")
    leak = screenshots.leaking_line(ROOT / "app" / "main.py")
    builder = ProfileBuilder(
        sample_types=[("inuse_objects", "count"), ("inuse_space", "bytes")],
        default_sample_type="inuse_space",
        period_type=("space", "bytes"),
        period=1,
    )
    for method, size in ((_ProxyMeter.create_histogram, 3 << 20), (_ProxyMeter.__init__, 1 << 20)):
        lines, first = inspect.getsourcelines(method)
        leaf = (inspect.getsourcefile(method) or "", first + len(lines) - 1)
        builder.add_sample([leaf, (main_py, leak)], [size // 100, size])
    path.write_bytes(builder.encode())


def test_the_pprof_web_ui_screenshots_are_tagged_and_not_blank(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    """scripts/screenshots.py's pprof step, on a small profile: chromium and pprof for real."""
    require_tool("chromium")
    require_tool("go")
    profile = tmp_path / "leak.pb.gz"
    small_leak_profile(profile)
    screenshots.pprof_ui(profile, tmp_path, "test-run")
    for name in ("pprof-graph.png", "pprof-flame.png", "pprof-source.png"):
        data = (tmp_path / name).read_bytes()
        assert png_file.texts(data) == {screenshots.RUN_KEYWORD: "test-run"}, name
        assert png_file.blankness(data) == "", name


def test_the_pprof_step_refuses_a_profile_whose_leak_is_elsewhere(tmp_path: Path) -> None:
    builder = ProfileBuilder([("inuse_space", "bytes")], ("space", "bytes"), 1)
    builder.add_sample([(str(ROOT / "app" / "main.py"), 1)], [1 << 20])
    profile = tmp_path / "elsewhere.pb.gz"
    profile.write_bytes(builder.encode())
    with pytest.raises(screenshots.ScreenshotError, match="not at app/main.py"):
        screenshots.pprof_ui(profile, tmp_path, "test-run")


def test_prometheus_config_keeps_the_projects_settings_and_labels_each_target() -> None:
    project = ROOT / "prometheus" / "prometheus.yml"
    urls = {"leaky": "http://127.0.0.1:1234", "fixed": "http://127.0.0.1:5678"}
    config = json.loads(screenshots.prometheus_config(project, urls))
    original = screenshots.yaml.safe_load(project.read_text())
    assert config["global"] == original["global"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "leaker" and job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [
        {"targets": ["127.0.0.1:1234"], "labels": {"mode": "leaky"}},
        {"targets": ["127.0.0.1:5678"], "labels": {"mode": "fixed"}},
    ]


def test_relative_paths_cuts_the_project_directory_from_the_profiles_strings() -> None:
    builder = ProfileBuilder([("inuse_space", "bytes")], ("space", "bytes"), 1)
    builder.add_sample([(str(ROOT / "app" / "main.py"), 43)], [1 << 20])
    raw = zlib.decompress(builder.encode(), 31)  # 31: a gzip stream
    cut = screenshots.relative_paths(raw)
    assert str(ROOT).encode() in raw and str(ROOT).encode() not in cut
    profile = screenshots.read_profile(cut)
    assert [frame[1:] for frame in profile.samples[0].stack] == [("app/main.py", 43)]
