"""The service with PPROF_HEAP_PROFILER=sampling: Go's kind of heap profile, read by pprof.

What a reader of the Form3 post does, with Go's always-on profiler in Python: load the leaky
service with 5,000 requests, take the heap profile before and after, and ask pprof what grew
(`-base`). The growth must lead to OpenTelemetry's proxy meter and, with `-lines`, to the line of
app/main.py that builds the middleware per request; the fixed service's growth must not.

5,000 requests leave about 5 MB of leak: ten samples at the default 512 KiB, too few for a
ranking that never flips. The services sample at 16 KiB (about 300 samples of the leak);
benchmarks/sampled_heap_accuracy.py measures the default's spread.
"""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import asgi_pprof
from app.heap_metrics import HEAP_INUSE_METRIC, OWN_BYTES_METRIC, TABLE_FULL_METRIC
from app.main import create_app
from app.settings import Settings, SettingsError
from tests.go_pprof import run_pprof
from tests.service import ROOT, running_service
from tests.test_heap_profile import (
    PER_REQUEST_WRAPPER,
    get,
    leaking_line,
    send_load,
    top_rows,
)

RATE = 16384
WARMUP_REQUESTS = 200
LOAD_REQUESTS = 5000
PROXY_METER = "opentelemetry.metrics._internal._Proxy"  # _ProxyMeter, _ProxyMeterProvider...


@dataclass
class Run:
    url: str
    base: Path  # /debug/pprof/heap after the warm-up
    heap: Path  # ... after the load
    allocs: Path
    text: str  # heap?debug=1 after the load
    index: str
    gauge_before: float
    gauge_after: float


def gauge(url: str) -> float:
    """The live-heap gauge, after checking the profiler's own gauges beside it: its tables within
    the default bound, and on the demo's service never full."""
    metrics = get(url + "/metrics").decode()
    values = {}
    for name in (HEAP_INUSE_METRIC, OWN_BYTES_METRIC, TABLE_FULL_METRIC):
        match = re.search(rf"^{name} (\S+)$", metrics, re.M)
        assert match, f"no {name} on /metrics"
        values[name] = float(match[1])
    assert 0 < values[OWN_BYTES_METRIC] <= 4 * 2**20
    assert values[TABLE_FULL_METRIC] == 0
    return values[HEAP_INUSE_METRIC]


def load_and_profile(mode: str, tmp_path: Path) -> Run:
    env = {
        "LEAK_MODE": mode,
        "PPROF_HEAP_PROFILER": "sampling",
        "PPROF_MEM_PROFILE_RATE": str(RATE),
    }
    with running_service(env, tmp_path) as service:
        profile = service.url + "/debug/pprof/"
        send_load(service, WARMUP_REQUESTS)
        base, heap, allocs = (tmp_path / f"{mode}-{name}.pb.gz" for name in ("base", "heap", "a"))
        base.write_bytes(get(profile + "heap"))
        before = gauge(service.url)
        send_load(service, LOAD_REQUESTS)
        heap.write_bytes(get(profile + "heap"))
        allocs.write_bytes(get(profile + "allocs"))
        text = get(profile + "heap?debug=1").decode()
        index = get(profile).decode()
        return Run(service.url, base, heap, allocs, text, index, before, gauge(service.url))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Both services side by side, so that both see the same busy machine."""
    tmp_path = tmp_path_factory.mktemp("sampled")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {
            mode: pool.submit(load_and_profile, mode, tmp_path) for mode in ("leaky", "fixed")
        }
        yield {mode: future.result() for mode, future in futures.items()}


def test_the_growth_of_the_leaky_service_has_the_proxy_meter_first(
    runs: dict[str, Run], require_tool: Callable[[str], str]
) -> None:
    leaky = runs["leaky"]
    output = run_pprof(require_tool("go"), "-top", "-base", str(leaky.base), str(leaky.heap))
    print(output)
    assert "Type: inuse_space" in output
    assert f"one allocation sampled per {RATE} bytes" in output  # the comment names the backend
    assert top_rows(output)[0].name.startswith(PROXY_METER)


def test_pprof_lines_reach_the_line_that_builds_the_middleware_per_request(
    runs: dict[str, Run], require_tool: Callable[[str], str]
) -> None:
    leaky = runs["leaky"]
    output = run_pprof(
        require_tool("go"),
        "-top",
        "-lines",
        "-nodecount=500",
        "-focus=OpenTelemetryMiddleware",
        "-base",
        str(leaky.base),
        str(leaky.heap),
    )
    print(output)
    location = f"{ROOT / 'app' / 'main.py'}:{leaking_line()}"
    rows = [row for row in top_rows(output) if row.name == f"{PER_REQUEST_WRAPPER} {location}"]
    assert len(rows) == 1, f"{location} not listed"
    assert rows[0].cum_percent >= 50


def test_the_growth_of_the_fixed_service_has_no_proxy_meter_frame(
    runs: dict[str, Run], require_tool: Callable[[str], str]
) -> None:
    fixed = runs["fixed"]
    output = run_pprof(
        require_tool("go"), "-top", "-nodecount=1000", "-base", str(fixed.base), str(fixed.heap)
    )
    print(output)
    grown = [row.name for row in top_rows(output) if not row.flat.startswith("-")]
    assert not [name for name in grown if name.startswith(PROXY_METER)]


def test_allocs_and_the_legacy_text_carry_the_allocation_totals(
    runs: dict[str, Run], require_tool: Callable[[str], str]
) -> None:
    go = require_tool("go")
    leaky = runs["leaky"]
    output = run_pprof(go, "-top", "-nodecount=5", str(leaky.allocs))
    assert "Type: alloc_space" in output
    header = re.fullmatch(
        r"heap profile: (\d+): (\d+) \[(\d+): (\d+)\] @ heap/(\d+)", leaky.text.split("\n")[0]
    )
    assert header and int(header[5]) == 2 * RATE
    assert int(header[3]) > int(header[1]) > 0  # many more blocks allocated than still in use
    inuse = run_pprof(go, "-top", "-sample_index=inuse_space", str(leaky.heap))
    assert "Type: inuse_space" in inuse


def test_the_index_says_which_backend_answers_and_lists_allocs(runs: dict[str, Run]) -> None:
    index = runs["leaky"].index
    assert "<a href='allocs?debug=1'>allocs</a>" in index
    assert f"one allocation sampled per {RATE} bytes allocated on average" in index


def test_the_sampled_live_heap_gauge_grows_with_the_leak(runs: dict[str, Run]) -> None:
    leaky, fixed = runs["leaky"], runs["fixed"]
    print(f"{HEAP_INUSE_METRIC}: leaky {leaky.gauge_before:.0f} -> {leaky.gauge_after:.0f}, "
          f"fixed {fixed.gauge_before:.0f} -> {fixed.gauge_after:.0f}")  # fmt: skip
    assert leaky.gauge_after - leaky.gauge_before > 2_000_000  # about 1 KB a request
    assert fixed.gauge_after - fixed.gauge_before < (leaky.gauge_after - leaky.gauge_before) / 3


def test_the_heap_profiler_settings_are_validated() -> None:
    assert Settings.from_environ({}).heap_profiler == "tracemalloc"  # the design's default
    assert Settings.from_environ({}).mem_profile_rate == 524288
    chosen = Settings.from_environ(
        {"PPROF_HEAP_PROFILER": "Sampling", "PPROF_MEM_PROFILE_RATE": "65536"}
    )
    assert (chosen.heap_profiler, chosen.mem_profile_rate) == ("sampling", 65536)
    with pytest.raises(SettingsError, match="PPROF_HEAP_PROFILER='gperf'.*tracemalloc, sampling"):
        Settings.from_environ({"PPROF_HEAP_PROFILER": "gperf"})
    for bad in ("0", "fast", "-1", str((1 << 40) + 1)):
        with pytest.raises(SettingsError, match="PPROF_MEM_PROFILE_RATE"):
            Settings.from_environ({"PPROF_MEM_PROFILE_RATE": bad})
    assert Settings.from_environ({}).mem_profile_max_bytes == 4 << 20
    for bad in ("1000", "4M", str((1 << 34) + 1)):
        with pytest.raises(SettingsError, match="PPROF_MEM_PROFILE_MAX_BYTES.*262144 to"):
            Settings.from_environ({"PPROF_MEM_PROFILE_MAX_BYTES": bad})


def test_a_sampler_that_cannot_start_stops_the_service_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Docker image once shipped without the C extension and served on, unsampled, with a
    log line nobody read: asked for by name, the sampler runs or the service does not start."""

    def unavailable(
        rate: int | None = None, max_bytes: int | None = None, threads: bool = True
    ) -> None:
        raise asgi_pprof.SamplingUnavailable("the C extension asgi_pprof._memprof is not installed")

    monkeypatch.setattr(asgi_pprof.sampling, "is_running", lambda: False)
    monkeypatch.setattr(asgi_pprof, "start_sampling", unavailable)
    settings = Settings.from_environ({"PPROF_HEAP_PROFILER": "sampling"})
    with pytest.raises(SettingsError) as raised:
        create_app(settings)
    message = str(raised.value)
    assert "PPROF_HEAP_PROFILER=sampling" in message and "_memprof is not installed" in message
    assert "PPROF_HEAP_PROFILER=tracemalloc" in message
