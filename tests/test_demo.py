"""`leaker demo` as a user runs it, and the tutorial it feeds.

The demo runs for real, as a subprocess with a small load: its verdicts are checked against the
numbers it saved, its profile reader against `go tool pprof` and an independent decoder, and
its ending against what a reader needs next (stopping early: test_demo_stopping.py).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import ProcessCollector

from app import demo, demo_report, demo_services
from app.demo import ModeResult
from app.demo import Sample as RSSSample
from asgi_pprof.reader import Line, Profile, Sample, read_profile

ROOT = Path(__file__).resolve().parent.parent
LEAKER = [sys.executable, "-m", "app.cli"]
DEMO_REQUESTS = 300  # per service: ~10 s at the few tens of requests/s that tracing allows
DEMO_TIMEOUT_SECONDS = 300
MAIN_PY = str(ROOT / "app" / "main.py")
OTEL_INIT = "/venv/site-packages/opentelemetry/metrics/_internal/__init__.py"


MAIN_PY_LEAK = (MAIN_PY, "app.main.OpenTelemetryPerRequest.__call__")


def otel_sample(size: int, main_line: int | None) -> Sample:
    stack = [("opentelemetry.metrics._internal._ProxyMeter.create_histogram", OTEL_INIT, 1)]
    if main_line is not None:
        stack.append(("app.main.OpenTelemetryPerRequest.__call__", MAIN_PY, main_line))
    stack.append(("uvicorn.protocols.http.h11_impl.RequestResponseCycle.run_asgi", "/x.py", 1))
    return Sample(tuple(stack), [size])


def heap_of(*samples: Sample) -> Profile:
    return Profile([("inuse_space", "bytes")], list(samples), "inuse_space")


def test_the_culprit_is_the_main_py_line_most_opentelemetry_memory_comes_from() -> None:
    leak_line = next(
        number
        for number, text in enumerate(Path(MAIN_PY).read_text().splitlines(), 1)
        if "OpenTelemetryMiddleware(self.app)" in text
    )
    heap = heap_of(
        otel_sample(5000, leak_line),
        otel_sample(3000, leak_line),
        otel_sample(2000, leak_line + 1000),  # another line: less memory
        otel_sample(1000, None),  # OpenTelemetry, not from app/main.py
        # from app/main.py, but not allocated inside OpenTelemetry: not counted
        Sample((("app.main.ok", MAIN_PY, leak_line),), [99_999]),
    )
    culprit = demo.find_culprit(heap)
    assert culprit is not None
    assert (culprit.filename, culprit.line) == (MAIN_PY, leak_line)
    assert (culprit.value, culprit.matching_value) == (8000, 11_000)
    assert "OpenTelemetryMiddleware(self.app)" in culprit.source
    assert demo.find_culprit(heap_of(otel_sample(1000, None))) is None


def mode_result(mode: str, requests: int, traced_growth: int) -> ModeResult:
    result = ModeResult(mode, 1, "http://127.0.0.1:1", requests=requests)
    result.traced_start_bytes = 1_000_000
    result.traced_end_bytes = 1_000_000 + traced_growth
    result.samples = [RSSSample(0, 0, 50_000_000), RSSSample(1, requests, 50_000_000)]
    return result


CULPRIT = Line(MAIN_PY, 39, "await ...", 1000, 1000)


@pytest.mark.parametrize(
    ("leaky_growth", "fixed_growth", "culprit", "problem"),
    [
        (1000 * 1000, 0, CULPRIT, None),
        (1000 * 1000, -5000, CULPRIT, None),  # shrinking is not growing
        (1000 * 400, 0, CULPRIT, "less than the 500 B/request"),
        (1000 * 1000, 1000 * 100, CULPRIT, "not under 10%"),
        (1000 * 1000, 1000 * 99, CULPRIT, None),
        (1000 * 1000, 0, None, "no OpenTelemetry allocation made from app/main.py"),
    ],
)
def test_verdict_thresholds(
    leaky_growth: int, fixed_growth: int, culprit: Line | None, problem: str | None
) -> None:
    results = {
        "leaky": mode_result("leaky", 1000, leaky_growth),
        "fixed": mode_result("fixed", 1000, fixed_growth),
    }
    problems = demo.verdict(results, culprit)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0]


def test_verdict_without_requests_says_so() -> None:
    results = {"leaky": mode_result("leaky", 0, 0), "fixed": mode_result("fixed", 1000, 0)}
    problems = demo.verdict(results, CULPRIT)
    assert "the leaky service served no requests" in problems


def test_services_export_traces_only_where_the_user_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_ZIPKIN_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")  # not what the demo wants either
    env = demo_services.service_environment("fixed", 8)
    assert env["OTEL_TRACES_EXPORTER"] == "none"
    assert (env["LEAK_MODE"], env["PPROF_TRACEMALLOC"]) == ("fixed", "startup")
    assert env["PPROF_TRACEMALLOC_FRAMES"] == "8"
    monkeypatch.setenv("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://zipkin:9411/api/v2/spans")
    env = demo_services.service_environment("leaky", 8)
    assert env["OTEL_TRACES_EXPORTER"] == "zipkin"
    assert env["OTEL_SERVICE_NAME"] == "leaker-leaky"
    # queued spans are exported before the last profile, which comes SETTLE_SECONDS later
    assert int(env["OTEL_BSP_SCHEDULE_DELAY"]) < demo.SETTLE_SECONDS * 1000


def test_resident_bytes_is_what_prometheus_reports_as_resident_memory() -> None:
    metrics = {
        sample.name: sample.value
        for family in ProcessCollector(registry=None).collect()
        for sample in family.samples
    }
    from_proc = demo_services.resident_bytes(os.getpid())
    assert from_proc is not None
    assert abs(from_proc - metrics["process_resident_memory_bytes"]) < 2**20
    from_ps = demo_services._resident_bytes_from_ps(os.getpid())  # where there is no /proc
    assert from_ps is not None and abs(from_ps - from_proc) < 2**20
    assert demo_services.resident_bytes(2**22 + 12345) is None  # no such process


def test_piped_progress_ends_with_the_last_update_even_when_it_came_soon_after_one_shown() -> None:
    out = io.StringIO()
    progress = demo_report.Progress(out, {"leaky": mode_result("leaky", 0, 0)})
    for tick in range(1, 81):  # every 0.5 s, as the demo samples; the load ends at 39.9 s
        progress.update("leaky", 10 * tick, 0, min(tick * 0.5, 39.9))
    progress.finish("leaky")
    progress.finish("leaky")  # nothing new: not written twice
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["5.0", "10.0", "15.0", "20.0", "25.0"] + [
        "30.0",
        "35.0",
        "39.9",
    ]
    assert lines[-1].split()[3] == "800"  # the requests the load ended with


# --- The demo, run for real ---


@dataclass
class DemoRun:
    output: Path
    returncode: int
    stdout: str
    stderr: str
    summary: dict[str, Any]


def service_pids(stdout: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"Started the \w+ service: pid (\d+)", stdout)]


def is_gone(pid: int) -> bool:
    """Neither the process nor anything in its process group exists, not even as a zombie."""
    for probe in (os.kill, os.killpg):
        try:
            probe(pid, 0)
            return False
        except ProcessLookupError:
            pass
    return True


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    output = tmp_path_factory.mktemp("demo") / "out"
    finished = subprocess.run(
        [*LEAKER, "demo", "--requests", str(DEMO_REQUESTS), "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SECONDS,
        env={**os.environ, "OTEL_EXPORTER_ZIPKIN_ENDPOINT": ""},
    )
    print(finished.stdout, finished.stderr)
    summary_path = output / "demo.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return DemoRun(output, finished.returncode, finished.stdout, finished.stderr, summary)


def test_the_demo_shows_the_leak_and_the_fix(demo_run: DemoRun) -> None:
    assert demo_run.returncode == 0, demo_run.stdout + demo_run.stderr
    summary = demo_run.summary
    assert summary["story_held"] and summary["problems"] == []
    leaky, fixed = summary["modes"]["leaky"], summary["modes"]["fixed"]
    for numbers in (leaky, fixed):
        assert numbers["requests"] == DEMO_REQUESTS and numbers["errors"] == 0
        assert numbers["traced_growth_per_request"] == pytest.approx(
            (numbers["traced_end_bytes"] - numbers["traced_start_bytes"]) / DEMO_REQUESTS
        )
        # memory was sampled against requests served, from 0 to all of them
        requests_seen = [sample["requests"] for sample in numbers["samples"]]
        assert requests_seen[0] == 0 and requests_seen[-1] == DEMO_REQUESTS
        assert requests_seen == sorted(requests_seen) and len(requests_seen) >= 3
    assert leaky["traced_growth_per_request"] >= 500
    assert leaky["traced_growth_per_request"] > 10 * max(fixed["traced_growth_per_request"], 0)
    # the table prints the same numbers
    growth_row = next(line for line in demo_run.stdout.splitlines() if "traced growth" in line)
    assert f"{round(leaky['traced_growth_per_request']):,} B" in growth_row


def test_the_demo_names_the_line_that_builds_the_middleware_per_request(demo_run: DemoRun) -> None:
    culprit = demo_run.summary["culprit"]
    assert culprit["file"] == os.path.join("app", "main.py")
    source_line = Path(MAIN_PY).read_text().splitlines()[culprit["line"] - 1]
    assert "OpenTelemetryMiddleware(self.app)" in source_line
    assert f"\n    {culprit['line']} | {source_line.strip()}\n" in demo_run.stdout
    assert "leaky.heap.pb.gz" in demo_run.stdout
    assert "go tool pprof -top -lines -focus=OpenTelemetryMiddleware" in demo_run.stdout


def test_the_demo_ends_its_progress_where_the_load_ended(demo_run: DemoRun) -> None:
    for mode in ("leaky", "fixed"):
        shown = [
            line for line in demo_run.stdout.splitlines() if re.match(rf"{mode} +[\d.]+ s ", line)
        ]
        assert shown, demo_run.stdout
        served = demo_run.summary["modes"][mode]["requests"]
        assert re.search(rf" {served} requests ", shown[-1]), (mode, shown[-1])


def test_the_demo_ends_with_what_to_do_next(demo_run: DemoRun) -> None:
    ending = demo_run.stdout[demo_run.stdout.index("The story held") :]
    for step in ("docs/tutorial.md", "make serve", "docker compose up"):
        assert step in ending, step
    assert (ROOT / "docs" / "tutorial.md").is_file()
    assert re.search(r"^serve:", (ROOT / "Makefile").read_text(), re.MULTILINE)
    # pprof's UI on this machine only: the profile names the service's code
    assert "go tool pprof -http=127.0.0.1:8081 " in demo_run.stdout
    assert not re.search(r"-http=:\d", demo_run.stdout)


def test_the_demo_says_why_rss_grows_more_than_the_traced_heap(demo_run: DemoRun) -> None:
    table_end = demo_run.stdout.index("traced growth/request")
    why = demo_run.stdout[table_end : demo_run.stdout.index("Resident memory against")]
    for reason in ("fragmentation", "arenas", "tracemalloc's own"):
        assert reason in why, reason


def test_the_demo_saves_its_files(demo_run: DemoRun) -> None:
    for name in demo_run.summary["files"] + ["demo.json"]:
        assert (demo_run.output / name).stat().st_size > 0, name
    root = ElementTree.parse(demo_run.output / "memory.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2
    assert sorted(path.name for path in demo_run.output.iterdir()) == sorted(
        demo_run.summary["files"] + ["demo.json"]
    )


def test_the_demo_leaves_no_process_behind(demo_run: DemoRun) -> None:
    pids = service_pids(demo_run.stdout)
    assert len(pids) == 2
    assert pids == [demo_run.summary["modes"][mode]["pid"] for mode in ("leaky", "fixed")]
    assert all(is_gone(pid) for pid in pids)


def test_the_saved_profile_holds_the_traced_heap_the_demo_reports(demo_run: DemoRun) -> None:
    data = (demo_run.output / "leaky.heap.pb.gz").read_bytes()
    total = read_profile(data).total("inuse_space")
    assert total == demo_run.summary["modes"]["leaky"]["traced_end_bytes"]


def test_the_demo_prints_the_top_as_go_tool_pprof_does(
    demo_run: DemoRun, require_tool: Callable[[str], str]
) -> None:
    go, top = require_tool("go"), demo_report.TOP_FUNCTIONS
    pprof = subprocess.run(
        [go, "tool", "pprof", "-top", f"-nodecount={top}", "leaky.heap.pb.gz"],
        cwd=demo_run.output,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    theirs = pprof.stdout[pprof.stdout.index("Showing nodes accounting for") :]
    assert theirs in demo_run.stdout


# --- The tutorial ---


def load_make_docs() -> Any:
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "scripts" / "make_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tutorial_is_its_template_filled_from_the_committed_outputs() -> None:
    make_docs = load_make_docs()
    docs = ROOT / "docs"
    template = (docs / "tutorial.template.md").read_text()
    rendered = make_docs.render(template, docs / "generated")
    assert rendered == (docs / "tutorial.md").read_text(), "run `make docs`"
    assert "{{" not in rendered
    assert make_docs.check(docs) == []
    # every placeholder names something that exists; every generated file linked exists
    for kind, name in make_docs.PLACEHOLDER.findall(template):
        if kind == "file":
            assert (docs / "generated" / name).is_file(), name
    links = make_docs.GENERATED_LINK.findall(rendered)
    assert "generated/memory.svg" in links
    for link in links:
        assert (docs / link).is_file(), link


def test_the_tutorial_outputs_have_no_machine_paths_or_times() -> None:
    generated = ROOT / "docs" / "generated"
    for path in generated.iterdir():
        if path.suffix == ".png":
            continue  # screenshots: tests/test_docs_images.py checks them
        text = path.read_text()
        assert str(ROOT) not in text, path.name
        assert sys.prefix not in text and "/tmp/" not in text, path.name
        assert not re.search(r"Time: \w{3} \d", text), path.name


def test_render_fills_placeholders_and_refuses_unknown_ones(tmp_path: Path) -> None:
    make_docs = load_make_docs()
    (tmp_path / "out.txt").write_text("line one\nline two\n")
    (tmp_path / "values.json").write_text('{"growth": "1,010"}')
    template = "A\n{{file:out.txt}}\nB {{value:growth}} B/request\n"
    assert make_docs.render(template, tmp_path) == "A\nline one\nline two\nB 1,010 B/request\n"
    with pytest.raises(make_docs.TemplateError):
        make_docs.render("{{file:missing.txt}}", tmp_path)
    with pytest.raises(make_docs.TemplateError):
        make_docs.render("{{value:missing}}", tmp_path)


def test_make_docs_regenerates_every_output_the_tutorial_uses(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    """The script itself, with small loads, into a copy of docs/: dependencies may move."""
    require_tool("go")
    require_tool("dot")
    docs = tmp_path / "docs"
    docs.mkdir()
    template = (ROOT / "docs" / "tutorial.template.md").read_text()
    (docs / "tutorial.template.md").write_text(template)
    finished = subprocess.run(
        [
            sys.executable,
            "scripts/make_docs.py",
            "--docs",
            str(docs),
            "--requests",
            "200",
            "--demo-requests",
            # Enough that a one-off allocation of tens of kB in the fixed service (a lazy import,
            # say) stays under a tenth of the leak per request: at 200, 22 kB was 110 B/request.
            "1000",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert finished.returncode == 0, finished.stderr
    committed = {path.name for path in (ROOT / "docs" / "generated").iterdir()}
    regenerated = {path.name for path in (docs / "generated").iterdir()}
    assert regenerated == committed
    assert load_make_docs().check(docs) == []
    tutorial = (docs / "tutorial.md").read_text()
    assert "OpenTelemetryMiddleware(self.app)" in tutorial
    focus = (docs / "generated" / "pprof-focus-lines.txt").read_text()
    assert "app.main.OpenTelemetryPerRequest.__call__ .../app/main.py:" in focus
