"""What the demo measures and how it shows it: per-service results, live progress, the table,
the chart's series and the closing report."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from app import chart
from app.demo_services import PACKAGE_ROOT
from asgi_pprof.reader import Line, Profile, format_top

SAMPLE_INTERVAL_SECONDS = 0.5  # resident memory sampled this often during the load
PIPED_PROGRESS_SECONDS = 5.0
TOP_FUNCTIONS = 10
PPROF_UI = "127.0.0.1:8081"  # pprof's web UI, on this machine only: the profile names its code

RSS_AND_TRACED = """
Why RSS and the traced heap grow by different amounts: tracemalloc counts the bytes Python
asked for, not what holding them costs: pymalloc's pools and arenas, malloc's headers and free
space left between live blocks (fragmentation), pages touched once and kept. Memory allocated
outside Python's allocators, and tracemalloc's own records of each block's stack, are in RSS
only. The traced heap is what points at the code; RSS is what the machine pays."""

NEXT_STEPS = """
What next:
  - docs/tutorial.md takes the blog's steps one by one on this service, with pprof's web UI.
  - make serve starts one service (LEAK_MODE=leaky by default, LEAK_MODE=fixed for the fix)
    on http://localhost:8080; leaker load sends it requests from another terminal.
  - docker compose up is the workshop: the leaky service under load, Prometheus on
    http://localhost:9090 and Zipkin on http://localhost:9411."""


@dataclass
class Sample:
    elapsed_seconds: float
    requests: int
    rss_bytes: int


@dataclass
class ModeResult:
    mode: str
    pid: int
    url: str
    requests: int = 0
    errors: int = 0
    duration_seconds: float = 0.0
    traced_start_bytes: int = 0
    traced_end_bytes: int = 0
    samples: list[Sample] = field(default_factory=list)

    @property
    def rss_start_bytes(self) -> int:
        return self.samples[0].rss_bytes if self.samples else 0

    @property
    def rss_end_bytes(self) -> int:
        return self.samples[-1].rss_bytes if self.samples else 0

    def requests_per_second(self) -> float:
        return self.requests / self.duration_seconds if self.duration_seconds > 0 else 0.0

    def traced_growth_per_request(self) -> float:
        return _per_request(self.traced_end_bytes - self.traced_start_bytes, self.requests)

    def rss_growth_per_request(self) -> float:
        return _per_request(self.rss_end_bytes - self.rss_start_bytes, self.requests)

    def to_json(self) -> dict[str, Any]:
        numbers = asdict(self)
        numbers.update(
            rss_start_bytes=self.rss_start_bytes,
            rss_end_bytes=self.rss_end_bytes,
            requests_per_second=self.requests_per_second(),
            traced_growth_per_request=self.traced_growth_per_request(),
            rss_growth_per_request=self.rss_growth_per_request(),
        )
        return numbers


def _per_request(growth: int, requests: int) -> float:
    return growth / requests if requests else math.nan


class Progress:
    """One line per service: rewritten in place on a terminal, every few seconds otherwise."""

    def __init__(self, stream: TextIO, results: dict[str, ModeResult]) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.results = results
        self.lines = {mode: f"{mode:<6} starting" for mode in results}
        self.shown_at = dict.fromkeys(results, 0.0)
        self.printed = dict.fromkeys(results, "")  # piped: the line last written, per service
        self.drawn = False

    def update(self, mode: str, done: int, errors: int, elapsed: float) -> None:
        samples = self.results[mode].samples
        rss = f"RSS {samples[-1].rss_bytes / 2**20:6.1f} MiB" if samples else ""
        rate = done / elapsed if elapsed > 0 else 0.0
        self.lines[mode] = (
            f"{mode:<6} {elapsed:5.1f} s {done:7d} requests {errors:4d} errors "
            f"{rate:6.1f} req/s  {rss}"
        )
        if self.live:
            up = f"\x1b[{len(self.lines)}F" if self.drawn else ""
            self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in self.lines.values()))
            self.drawn = True
        elif elapsed - self.shown_at[mode] >= PIPED_PROGRESS_SECONDS:
            self.shown_at[mode] = elapsed
            self._write(mode)
        self.stream.flush()

    def finish(self, mode: str) -> None:
        """Piped, the last update may have come too soon after the one shown: show it anyway,
        so that the output ends with where the load ended."""
        if not self.live and self.printed[mode] != self.lines[mode]:
            self._write(mode)
            self.stream.flush()

    def _write(self, mode: str) -> None:
        self.printed[mode] = self.lines[mode]
        self.stream.write(self.lines[mode] + "\n")


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def per_request_text(value: float) -> str:
    return "-" if math.isnan(value) else f"{round(value):,} B"  # round: no "-0 B"


def comparison_table(results: dict[str, ModeResult]) -> str:
    measures: list[tuple[str, Callable[[ModeResult], str]]] = [
        ("requests served", lambda r: f"{r.requests:,}"),
        ("errors", lambda r: f"{r.errors:,}"),
        ("requests/s", lambda r: f"{r.requests_per_second():.1f}"),
        ("RSS at start", lambda r: _mib(r.rss_start_bytes)),
        ("RSS at end", lambda r: _mib(r.rss_end_bytes)),
        ("RSS growth/request", lambda r: per_request_text(r.rss_growth_per_request())),
        ("traced heap at start", lambda r: _mib(r.traced_start_bytes)),
        ("traced heap at end", lambda r: _mib(r.traced_end_bytes)),
        ("traced growth/request", lambda r: per_request_text(r.traced_growth_per_request())),
    ]
    rows = [("", *results)]
    rows += [(label, *(show(r) for r in results.values())) for label, show in measures]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def memory_series(results: dict[str, ModeResult]) -> list[chart.Series]:
    styles = {"fixed": ("o", "#1f77b4"), "leaky": ("*", "#d62728")}
    return [
        chart.Series(
            f"{mode} (LEAK_MODE={mode})",
            [(s.requests, s.rss_bytes / 2**20) for s in results[mode].samples],
            *styles[mode],
        )
        for mode in ("fixed", "leaky")  # leaky last: drawn over fixed where they meet
        if mode in results
    ]


def relative(filename: str) -> str:
    path = Path(filename)
    return str(path.relative_to(PACKAGE_ROOT)) if path.is_relative_to(PACKAGE_ROOT) else filename


def report(
    results: dict[str, ModeResult],
    heap: Profile,
    culprit: Line | None,
    output: Path,
    out: TextIO,
) -> None:
    def say(text: str = "") -> None:
        print(text, file=out)

    leaky_profile = output / "leaky.heap.pb.gz"
    say("\nMemory at the start and end of the load (traced heap: the live blocks tracemalloc")
    say("traces, the heap profile's total; RSS: resident memory, process_resident_memory_bytes):")
    say(comparison_table(results))
    say(RSS_AND_TRACED)
    say(f"\nResident memory against requests served, sampled every {SAMPLE_INTERVAL_SECONDS:g} s:")
    say(chart.terminal_chart(memory_series(results), "requests served", "MiB", y_format=_one_digit))

    say(f"The leaky service's heap profile, {leaky_profile}, by function, as")
    say(f"`go tool pprof -top -nodecount={TOP_FUNCTIONS}` shows it:")
    say(format_top(heap, TOP_FUNCTIONS))
    if culprit is not None:
        share = culprit.value / culprit.matching_value if culprit.matching_value else 0.0
        say(f"The leak: {share:.0%} of the memory allocated inside OpenTelemetry was asked for")
        say(f"from this line, {relative(culprit.filename)}:{culprit.line}:")
        say(f"\n    {culprit.line} | {culprit.source}\n")
    say("Dig further with Go's pprof (`go tool pprof`, or `pprof` from github.com/google/pprof):")
    say(f"    go tool pprof -http={PPROF_UI} {leaky_profile}")
    say(f"    go tool pprof -top -lines -focus=OpenTelemetryMiddleware {leaky_profile}")
    say(f"    go tool pprof -top -nodefraction=0 {leaky_profile}")
    say(f"    go tool pprof -top -focus=OpenTelemetryMiddleware {output / 'fixed.heap.pb.gz'}")
    say()


def _one_digit(value: float) -> str:
    return f"{value:.1f}"
