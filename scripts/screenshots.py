"""The tutorial's screenshots, taken by `make docs` in a real browser: Debian's chromium, headless.

- prometheus-memory.png: real Prometheus (`prometheus`, whose Debian build serves the classic UI)
  with prometheus/prometheus.yml, only its targets rewritten to a leaky and a fixed
  `leaker serve` on 127.0.0.1, each labelled `mode`, while `leaker load` runs on each.
- pprof-graph.png, pprof-flame.png, pprof-source.png: `go tool pprof -http`'s web UI on the
  leaky service's heap profile from that same run. Those services run the sampling heap profiler
  (PPROF_HEAP_PROFILER=sampling, Go's kind, 64-frame stacks), not the 8-frame tracemalloc profile
  that the rest of the tutorial reads: whole stacks make the flame graph one tower.

Every PNG carries the run's id in a tEXt chunk (keyword `leaker-docs-run`), and `take` returns it
as `screenshots_run` for docs/generated/values.json, so tests/test_docs_images.py can tell that
the images and the other outputs come from the same run. Needs chromium, prometheus and go.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import yaml

from asgi_pprof.protobuf import VARINT, ProtoWriter, read_fields
from asgi_pprof.reader import read_profile, top_line
from scripts import png_file
from scripts.processes import LEAKER, ROOT, STARTUP_TIMEOUT_SECONDS, free_port, running, serving

RUN_KEYWORD = "leaker-docs-run"
TOOLS = ("chromium", "prometheus", "go")
LOAD_SECONDS = 75  # enough for the leaky line to climb clearly away from the fixed one
LOAD_CONCURRENCY = 2
MEMORY_QUERY = 'process_resident_memory_bytes{job="leaker"}'  # as the tutorial shows it
WINDOW = (1280, 800)  # text at its normal size stays legible when the page shows the image
PROMETHEUS_WINDOW = (1280, 860)  # down to the graph's legend, which tells leaky from fixed
SOURCE_WINDOW = (1280, 380)  # the function and the lines around it; below, an empty page
BROWSER_TIMEOUT_SECONDS = 90.0
RENDER_BUDGET_MS = 5000  # virtual time for a page's scripts and requests to finish drawing
LEAK_MARK = "# the leak"  # the comment on the leaking line of app/main.py
LEAK_FUNCTION = "OpenTelemetryPerRequest"
STRING_TABLE = 6  # profile.proto's field number of Profile.string_table


class ScreenshotError(Exception):
    """A page could not be shot, or the shot came out blank."""


def take(generated: Path, work: Path) -> dict[str, object]:
    """Every screenshot into `generated` (scratch files in `work`); the values for values.json."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"make_docs: screenshots need {' and '.join(missing)} (see .ci/run)")
    print(f"make_docs: screenshots, after {LOAD_SECONDS} s of load on both modes", file=sys.stderr)
    run_id = secrets.token_hex(8)
    started = time.monotonic()
    profile = prometheus_memory(generated / "prometheus-memory.png", work, run_id)
    pprof_ui(profile, generated, run_id)
    print(f"make_docs: screenshots took {time.monotonic() - started:.0f} s", file=sys.stderr)
    return {
        "screenshots_run": run_id,
        "screenshots_load_seconds": LOAD_SECONDS,
        "screenshots_leak_line": f"app/main.py:{leaking_line(ROOT / 'app' / 'main.py')}",
    }


# --- Prometheus ---


def prometheus_memory(png: Path, work: Path, run_id: str) -> Path:
    """Shoots Prometheus's graph of both services' memory under load; returns the path of the
    leaky service's heap profile, taken at the end of the load."""
    profile = work / "leaky.sampled.heap.pb.gz"
    logs = work / "screenshots"  # beside make_docs' own services' logs, not over them
    logs.mkdir(exist_ok=True)
    with ExitStack() as stack:
        urls = {
            mode: stack.enter_context(serving(mode, logs, "sampling"))
            for mode in ("leaky", "fixed")
        }
        config = work / "prometheus.yml"
        config.write_text(prometheus_config(ROOT / "prometheus" / "prometheus.yml", urls))
        prometheus = stack.enter_context(run_prometheus(config, work))
        wait_for_targets(prometheus, len(urls))
        loads = [
            subprocess.Popen(
                [*LEAKER, "load", "--url", f"{url}/", "--concurrency", str(LOAD_CONCURRENCY)]
                + ["--duration", str(LOAD_SECONDS)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for url in urls.values()
        ]
        for load in loads:  # unwound first: a load still running when something failed stops
            stack.callback(load.wait)
            stack.callback(load.kill)
        for load in loads:
            _, errors = load.communicate(timeout=LOAD_SECONDS + 60)
            if load.returncode != 0:
                raise ScreenshotError(f"leaker load failed:\n{errors.decode(errors='replace')}")
        profile.write_bytes(fetch(urls["leaky"] + "/debug/pprof/heap"))
        time.sleep(2)  # two more scrapes: the lines reach the end of the load
        # The range is the load and the few seconds before it, so that both lines fill the graph.
        query = {
            "g0.expr": MEMORY_QUERY,
            "g0.tab": "0",
            "g0.range_input": f"{LOAD_SECONDS + 10}s",
        }
        screenshot(
            f"{prometheus}/classic/graph?{urllib.parse.urlencode(query)}", png, PROMETHEUS_WINDOW
        )
    png_file.tag(png, RUN_KEYWORD, run_id)
    return profile


def prometheus_config(project_config: Path, urls: Mapping[str, str]) -> str:
    """The project's Prometheus configuration with its targets replaced by `urls`, one per mode.

    Everything else (scrape interval, metrics path) stays as the workshop stack runs it. JSON is
    YAML, so the result is written as JSON."""
    config = yaml.safe_load(project_config.read_text())
    (job,) = config["scrape_configs"]  # one job, `leaker`: the query selects it by name
    job["static_configs"] = [
        {"targets": [urllib.parse.urlsplit(url).netloc], "labels": {"mode": mode}}
        for mode, url in urls.items()
    ]
    return json.dumps(config, indent=2) + "\n"


@contextmanager
def run_prometheus(config: Path, work: Path) -> Iterator[str]:
    """Prometheus on a free loopback port, its data in `work`; yields its URL."""
    port = free_port()
    command = [
        "prometheus",
        f"--config.file={config}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={work / 'prometheus-data'}",
        "--log.level=warn",
    ]
    url = f"http://127.0.0.1:{port}"
    with running(command, url + "/-/ready", work / "prometheus.log", os.environ):
        yield url


def wait_for_targets(prometheus: str, count: int) -> None:
    """Until Prometheus has scraped `count` targets successfully: the graph starts before the
    load does."""
    query = urllib.parse.urlencode({"query": 'up{job="leaker"} == 1'})
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        answer = json.loads(fetch(f"{prometheus}/api/v1/query?{query}"))
        if len(answer["data"]["result"]) == count:
            time.sleep(5)  # a few points before the load, to climb from
            return
        time.sleep(0.5)
    raise ScreenshotError(f"Prometheus did not scrape {count} targets in time")


# --- pprof's web UI ---


def pprof_ui(profile: Path, generated: Path, run_id: str) -> None:
    """Shoots pprof's graph, flame graph and source view of `profile`, into `generated`."""
    pages = {
        # From the leaking middleware down (show_from): above it, 30 frames of server in a column.
        "pprof-graph.png": (f"/ui/?sf={LEAK_FUNCTION}", WINDOW),
        "pprof-flame.png": ("/ui/flamegraph", WINDOW),
        "pprof-source.png": (f"/ui/source?f={LEAK_FUNCTION}", SOURCE_WINDOW),
    }
    leak = top_line(read_profile(profile.read_bytes()), "app/main.py", "opentelemetry.")
    marked = leaking_line(ROOT / "app" / "main.py")
    if leak is None or leak.line != marked:
        raise ScreenshotError(f"the profile's leak is at {leak}, not at app/main.py:{marked}")
    with pprof_http(profile) as url:
        for name, (page, size) in pages.items():
            screenshot(url + page, generated / name, size)
            png_file.tag(generated / name, RUN_KEYWORD, run_id)


def leaking_line(source: Path) -> int:
    """The number of the line marked as the leak: the one the source view must show."""
    lines = source.read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.endswith(LEAK_MARK))


@contextmanager
def pprof_http(profile: Path) -> Iterator[str]:
    """`go tool pprof -http` on `profile`, on a free loopback port; yields its URL.

    File names are shown relative to the project (`app/main.py`, not this machine's path), and
    sources are read from it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="leaker-pprof-") as home:
        relative = Path(home) / profile.name
        relative.write_bytes(gzip.compress(relative_paths(gzip.decompress(profile.read_bytes()))))
        command = ["go", "tool", "pprof", "-no_browser", f"-http=127.0.0.1:{port}"]
        command += [f"-source_path={ROOT}", str(relative)]
        # pprof keeps a copy of what it reads in $PPROF_TMPDIR, else in $HOME/pprof.
        env = {**os.environ, "PPROF_TMPDIR": home}
        with running(command, url + "/ui/", Path(home) / "pprof.log", env):
            yield url


def relative_paths(profile: bytes) -> bytes:
    """profile.proto bytes with the project's directory cut from the start of every string.

    Only the top-level string_table fields change; every other field is copied as it was."""
    prefix = f"{ROOT}{os.sep}".encode()
    out = ProtoWriter()
    for number, value in read_fields(profile):
        if isinstance(value, int):
            out.key(number, VARINT)
            out.varint(value)
        else:
            if number == STRING_TABLE:
                value = value.removeprefix(prefix)
            out.bytes(number, value)
    return bytes(out.data)


# --- The browser ---


def screenshot(url: str, png: Path, size: tuple[int, int]) -> None:
    """Headless chromium's screenshot of `url` at `size`, once its scripts have drawn the page;
    fails unless the PNG has something on it."""
    with tempfile.TemporaryDirectory(prefix="leaker-chromium-") as profile_dir:
        command = [
            "chromium",
            "--headless",
            "--no-sandbox",  # chromium's sandbox needs user namespaces, which CI may not allow
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile_dir}",
            f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={RENDER_BUDGET_MS}",
            f"--screenshot={png}",
            url,
        ]
        png.unlink(missing_ok=True)
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_SECONDS
        )
    if done.returncode != 0 or not png.is_file():
        raise ScreenshotError(f"chromium could not shoot {url}:\n{done.stderr}")
    blank = png_file.blankness(png.read_bytes())
    if blank:
        raise ScreenshotError(f"{png.name} ({url}) looks blank: {blank}")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=STARTUP_TIMEOUT_SECONDS) as answer:
        return answer.read()
