"""Regenerate docs/tutorial.md from a real run: every output and image in it comes from here.

It takes the tutorial's own steps: runs `leaker demo` (what `make demo` runs), starts a leaky and
a fixed service with `leaker serve`, loads both with `leaker load`, fetches /metrics, /debug/pprof/
and the heap profiles, and runs `go tool pprof` with each flag the tutorial shows. The outputs go
to docs/generated/, with absolute paths and times normalised so that a rerun differs only in what
it measured; then docs/tutorial.template.md, its placeholders filled from them, becomes
docs/tutorial.md.

    make docs                     # PYTHONPATH=. .venv/bin/python scripts/make_docs.py
    PYTHONPATH=. .venv/bin/python scripts/make_docs.py --check
                                  # exit 1 unless docs/tutorial.md is the template filled
                                  # from docs/generated/ as committed

Placeholders: `{{file:NAME}}` is docs/generated/NAME (without its last newline), `{{value:KEY}}`
is KEY in docs/generated/values.json. Needs `go` (for `go tool pprof`), `dot` (graphviz), and for
the screenshots (scripts/screenshots.py) `chromium` and `prometheus`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from scripts import screenshots
from scripts.docs_routes import two_routes
from scripts.docs_text import (
    Normalise,
    heap_header,
    heap_text_excerpt,
    readable_svg,
    row_of,
    source_excerpt,
)
from scripts.docs_zipkin import one_span
from scripts.processes import serving

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LEAKER = [sys.executable, "-m", "app.cli"]
PLACEHOLDER = re.compile(r"\{\{(file|value):([^}]+)\}\}")
GENERATED_LINK = re.compile(r"\]\((generated/[^)\s]+)\)")
TUTORIAL_REQUESTS = 1000  # per service, in the by-hand steps
SHOWN_URL = "http://localhost:8080"  # where the tutorial's service listens (`leaker serve`)
LEAKY, FIXED = "leaky.heap.pb.gz", "fixed.heap.pb.gz"
FOCUS = "-focus=OpenTelemetryMiddleware"
# The focus graph: pprof's default cuts (nodes under 0.5%, edges under 0.1%) and at most 20 nodes.
# With -nodefraction=0 it was 3,460 px wide, a row of tiny nodes whose edges had been cut.
FOCUS_GRAPH = ["-nodecount=20", FOCUS]
SAMPLED = "sampled.heap.pb.gz"
# The sampler keeps one allocation per 512 KiB: the leak, about 1 KB a request, needs thousands of
# requests for tens of samples, and more than startup's. It runs at full speed: this many take
# under a minute.
SAMPLED_REQUESTS_PER_TUTORIAL_REQUEST = 20
ROUTE_REQUESTS_PER_TUTORIAL_REQUEST = 5  # on each of the two routes, at one sample per 64 KiB
HTTP_TIMEOUT_SECONDS = 120.0  # a profile of a traced heap takes seconds on two busy cores


class TemplateError(Exception):
    """A placeholder names a file or value that is not there."""


def render(template: str, generated: Path) -> str:
    """The template with every placeholder replaced from the files in `generated`."""
    values_path = generated / "values.json"
    values = json.loads(values_path.read_text()) if values_path.exists() else {}

    def fill(match: re.Match[str]) -> str:
        kind, name = match.group(1), match.group(2).strip()
        if kind == "file":
            path = generated / name
            if not path.is_file():
                raise TemplateError(f"{match.group(0)}: there is no {path}")
            return path.read_text().removesuffix("\n")
        if name not in values:
            raise TemplateError(f"{match.group(0)}: {values_path} has no {name!r}")
        return str(values[name])

    return PLACEHOLDER.sub(fill, template)


def check(docs: Path) -> list[str]:
    """What is wrong with the committed tutorial; empty when it is current."""
    try:
        rendered = render((docs / "tutorial.template.md").read_text(), docs / "generated")
    except TemplateError as error:
        return [str(error)]
    problems = []
    if rendered != (docs / "tutorial.md").read_text():
        problems.append(
            "docs/tutorial.md is not docs/tutorial.template.md filled from docs/generated/: "
            "run `make docs`"
        )
    for link in GENERATED_LINK.findall(rendered):
        if not (docs / link).is_file():
            problems.append(f"docs/tutorial.md links to {link}, which does not exist")
    return problems


# --- Running the steps ---


def run(command: list[str], cwd: Path) -> str:
    """The command's standard output; both its outputs are shown only if it fails (a demo says
    on its standard output why the story did not hold)."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr)
        raise SystemExit(f"make_docs: `{' '.join(command)}` exited with {done.returncode}")
    return done.stdout


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as answer:
        return answer.read()


def resident_memory(url: str) -> float:
    """process_resident_memory_bytes from the service's /metrics."""
    metrics = fetch(url + "/metrics").decode()
    found = re.search(r"^process_resident_memory_bytes (\S+)$", metrics, re.MULTILINE)
    if found is None:
        raise SystemExit(f"make_docs: {url}/metrics has no process_resident_memory_bytes")
    return float(found.group(1))


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def the_demo(work: Path, generated: Path, demo_requests: int | None) -> dict[str, object]:
    """Step 0, `make demo`: its output and chart, and its numbers as values."""
    output = work / "leaker-demo"
    demo_args = ["--requests", str(demo_requests)] if demo_requests else []
    printed = run([*LEAKER, "demo", "--output", str(output), *demo_args], ROOT)
    shown = f'make demo DEMO_ARGS="{" ".join(demo_args)}"' if demo_args else "make demo"
    normalise = Normalise({output: "leaker-demo"})
    (generated / "demo-output.txt").write_text(f"$ {shown}\n{normalise(printed)}")
    shutil.copyfile(output / "memory.svg", generated / "memory.svg")
    summary = json.loads((output / "demo.json").read_text())
    culprit = summary["culprit"]
    values = {"culprit": f"{culprit['file']}:{culprit['line']}", "culprit_line": culprit["line"]}
    for mode, numbers in summary["modes"].items():
        values[f"demo_{mode}_requests"] = f"{numbers['requests']:,}"
        for measure in ("traced", "rss"):
            growth = numbers[f"{measure}_growth_per_request"]
            values[f"demo_{mode}_{measure}_growth"] = f"{round(growth):,}"
    return values


def by_hand(work: Path, generated: Path, requests: int) -> dict[str, object]:
    """Steps 1-3: `leaker serve` in both modes, the same `leaker load` on each, then /metrics,
    /debug/pprof/ and the heap profiles (saved in `work` for pprof)."""
    with serving("leaky", work) as leaky_url, serving("fixed", work) as fixed_url:
        urls = {"leaky": leaky_url, "fixed": fixed_url}
        before = {mode: resident_memory(url) for mode, url in urls.items()}
        loads = {
            mode: subprocess.Popen(
                [*LEAKER, "load", "--url", url + "/", "--requests", str(requests)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for mode, url in urls.items()
        }
        printed = {mode: load.communicate()[0] for mode, load in loads.items()}
        if any(load.returncode != 0 for load in loads.values()):
            raise SystemExit("make_docs: leaker load failed")
        after = {mode: resident_memory(url) for mode, url in urls.items()}
        index = fetch(leaky_url + "/debug/pprof/").decode()
        heap_text = fetch(leaky_url + "/debug/pprof/heap?debug=1").decode()
        legacy = pprof_over_http(leaky_url, "/debug/pprof/heap?debug=1", work)
        (work / LEAKY).write_bytes(fetch(leaky_url + "/debug/pprof/heap"))
        (work / FIXED).write_bytes(fetch(fixed_url + "/debug/pprof/heap"))

    normalise = Normalise({work: "."})
    command = f"leaker load --url {SHOWN_URL}/ --requests {requests}"
    (generated / "load-output.txt").write_text(f"$ {command}\n{printed['leaky']}")
    (generated / "pprof-index.html").write_text(index)
    (generated / "pprof-debug1-http.txt").write_text(legacy)
    (generated / "heap-debug1-excerpt.txt").write_text(normalise(heap_text_excerpt(heap_text)))
    header = re.match(r"heap profile: (\d+): (\d+) ", heap_text)
    record = re.search(r"^(\d+): (\d+) \[", heap_text, re.M)
    traced = re.search(r"^# TracedBytes = (\d+)$", heap_text, re.M)
    assert header and record and traced, "the debug=1 heap profile changed its format"
    values: dict[str, object] = {
        "tutorial_requests": requests,
        "heap_blocks": int(header.group(1)),
        "heap_bytes": int(header.group(2)),
        "record_blocks": int(record.group(1)),
        "record_bytes": int(record.group(2)),
        "traced_bytes": int(traced.group(1)),
    }
    for mode in urls:
        growth = (after[mode] - before[mode]) / requests
        values[f"{mode}_rss_before_mib"] = mib(before[mode])
        values[f"{mode}_rss_after_mib"] = mib(after[mode])
        values[f"{mode}_rss_growth_per_request"] = f"{round(growth):,}"
    return values


def pprof_over_http(url: str, path: str, work: Path) -> str:
    """`go tool pprof -top` fetching `path` itself: for debug=1 text, whose addresses it names
    by asking the service's /debug/pprof/symbol. It keeps a copy in PPROF_TMPDIR, here `work`."""
    flags = ["-top", "-nodecount=5"]
    command = ["go", "tool", "pprof", *flags, url + path]
    env = {**os.environ, "PPROF_TMPDIR": str(work)}
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"make_docs: `{' '.join(command)}` failed:\n{done.stderr}")
    shown = f"$ go tool pprof {' '.join(flags)} '{SHOWN_URL}{path}'\n{done.stdout}"
    return Normalise({work: "."})(shown.replace(url, SHOWN_URL))


def sampled(work: Path, generated: Path, requests: int) -> dict[str, object]:
    """The same leak under Go's kind of heap profiler: its debug=1 header, field by field, and its
    profile (saved in `work` for pprof)."""
    with serving("leaky", work, profiler="sampling") as url:
        run([*LEAKER, "load", "--url", url + "/", "--requests", str(requests)], ROOT)
        text = fetch(url + "/debug/pprof/heap?debug=1").decode()
        (work / SAMPLED).write_bytes(fetch(url + "/debug/pprof/heap"))
    header = heap_header(text)
    (generated / "sampled-heap-header.txt").write_text(f"{header['line']}\n")
    rate = re.search(r"^# MemProfileRate = (\d+)$", text, re.MULTILINE)
    frames = re.search(r"^# MaxFrames = (\d+)$", text, re.MULTILINE)
    assert rate and frames, "the sampled debug=1 footer changed its format"
    values = {f"sampled_{key}": value for key, value in header.items() if key != "line"}
    return {
        **values,
        "sampled_requests": f"{requests:,}",
        "sampled_rate": int(rate.group(1)),
        "sampled_frames": int(frames.group(1)),
    }


def with_pprof(work: Path, generated: Path) -> None:
    """Steps 4 on: `go tool pprof` with each flag in turn, on the profiles `by_hand` saved."""
    go = shutil.which("go")
    assert go is not None
    normalise = Normalise({work: "."})
    texts = {
        "pprof-top.txt": ["-top", "-nodecount=15", LEAKY],
        "pprof-top-nodefraction0.txt": ["-top", "-nodefraction=0", "-nodecount=25", LEAKY],
        "pprof-focus-lines.txt": ["-top", "-lines", FOCUS, LEAKY],
        "pprof-focus-lines-cum.txt": ["-top", "-lines", "-cum", "-nodecount=5", FOCUS, LEAKY],
        "pprof-list.txt": ["-list=OpenTelemetryPerRequest", LEAKY],
        "pprof-fixed-focus.txt": ["-top", FOCUS, FIXED],
        "pprof-top-sampled.txt": ["-top", "-nodecount=10", SAMPLED],
        "pprof-top-exact.txt": ["-top", "-nodecount=10", LEAKY],
    }
    for name, flags in texts.items():
        printed = run([go, "tool", "pprof", *flags], work)
        (generated / name).write_text(normalise(f"$ go tool pprof {' '.join(flags)}\n{printed}"))
    images = {
        "leaky-heap.svg": ["-svg", LEAKY],
        "leaky-heap-focus.svg": ["-svg", *FOCUS_GRAPH, LEAKY],
    }
    for name, flags in images.items():
        svg = readable_svg(run([go, "tool", "pprof", *flags], work))
        (generated / name).write_text(normalise(svg))


def generate(docs: Path, requests: int, demo_requests: int | None) -> None:
    missing = [tool for tool in ("go", "dot") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"make_docs: needs {' and '.join(missing)} on PATH (see .ci/run)")
    generated = docs / "generated"
    if generated.exists():
        shutil.rmtree(generated)  # nothing stale stays behind
    generated.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="leaker-docs-") as temporary:
        work = Path(temporary)
        print("make_docs: leaker demo", file=sys.stderr)
        values = the_demo(work, generated, demo_requests)
        print(f"make_docs: leaker serve, leaker load x {requests} (both modes)", file=sys.stderr)
        values.update(by_hand(work, generated, requests))
        sampled_requests = SAMPLED_REQUESTS_PER_TUTORIAL_REQUEST * requests
        print(f"make_docs: sampling profiler, leaker load x {sampled_requests}", file=sys.stderr)
        values.update(sampled(work, generated, sampled_requests))
        route_requests = ROUTE_REQUESTS_PER_TUTORIAL_REQUEST * requests
        print(f"make_docs: labels, leaker load x {route_requests} on two routes", file=sys.stderr)
        values.update(two_routes(work, generated, route_requests))
        print("make_docs: one request traced to Zipkin", file=sys.stderr)
        values.update(one_span(work, generated))
        print("make_docs: go tool pprof", file=sys.stderr)
        with_pprof(work, generated)

        values.update(screenshots.take(generated, work))
    main_py = ROOT / "app" / "main.py"
    (generated / "leaky-wrapper.txt").write_text(
        source_excerpt(main_py, "class OpenTelemetryPerRequest", "# the leak") + "\n"
    )
    (generated / "fix.txt").write_text(
        source_excerpt(main_py, "if settings.leak_mode ==", "# the fix") + "\n"
    )
    mount = [("import asgi_pprof", "import asgi_pprof"), ("if settings.pprof_enabled:", "mount(")]
    excerpts = (source_excerpt(main_py, first, last) for first, last in mount)
    (generated / "mount.txt").write_text("\n ...\n".join(excerpts) + "\n")
    flat = (generated / "pprof-focus-lines.txt").read_text()
    values["culprit_row_flat"] = row_of(flat, "app.main.OpenTelemetryPerRequest.__call__")
    (generated / "values.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    tutorial = render((docs / "tutorial.template.md").read_text(), generated)
    (docs / "tutorial.md").write_text(tutorial)
    print(f"make_docs: wrote {docs / 'tutorial.md'} and {generated}{os.sep}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check docs/tutorial.md")
    parser.add_argument("--docs", type=Path, default=DOCS, help="docs directory (default: docs/)")
    parser.add_argument(
        "--requests",
        type=int,
        default=TUTORIAL_REQUESTS,
        help="requests per service in the by-hand steps (default: %(default)s)",
    )
    parser.add_argument(
        "--demo-requests", type=int, help="requests per service in the demo (default: its own)"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.docs)
        for problem in problems:
            print(f"make_docs --check: {problem}", file=sys.stderr)
        return 1 if problems else 0
    generate(args.docs, args.requests, args.demo_requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
