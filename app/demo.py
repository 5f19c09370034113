"""The leak, shown in about a minute: a leaky and a fixed service side by side, under the same load.

Starts both services (heap tracing on), warms them up, takes a heap profile of each, loads both
at once while sampling their resident memory, then takes the profiles again. It prints how much
memory each kept per request, the leaky profile's top allocation sites as `pprof -top` would,
the line of app/main.py the leak comes from, and a chart; it saves the profiles, the chart as
SVG and the numbers as JSON in the output directory. Exit status 0 means the story held: the
leaky service kept memory for every request, the fixed one did not, and the profile named the line.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import linecache
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import app as app_package
from app import chart
from app.cli import positive_int
from app.load import LoadResult, TargetUnreachable, run_load
from app.settings import Settings

MODES = ("leaky", "fixed")
DEFAULT_OUTPUT = "leaker-demo"
# Sized for the whole demo to end within a minute on 2 cores: ~10 s of startup, warm-up, profiles
# and shutdown around the load.
DEFAULT_DURATION_SECONDS = 40.0
# The services are CPU-bound (tracemalloc); a few connections keep them busy, and few in flight
# means the load ends soon after its deadline.
DEFAULT_CONCURRENCY = 10
DEFAULT_FRAMES = Settings.tracemalloc_frames  # the service's own default, chosen by measurement
WARMUP_REQUESTS = 20  # first requests build lazy state (Starlette's middleware stack, caches)
# Requests whose response the client has read still hold spans and connections for a moment;
# a profile taken that soon counts them as growth.
SETTLE_SECONDS = 1.0
BATCH_EXPORT_MILLISECONDS = 500  # with Zipkin: under SETTLE_SECONDS
SAMPLE_INTERVAL_SECONDS = 0.5
PIPED_PROGRESS_SECONDS = 5.0
STARTUP_TIMEOUT_SECONDS = 60.0
PROFILE_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 5.0
TOP_FUNCTIONS = 10

# The story holds when the leaky service keeps at least this much traced heap per request ...
LEAKY_MIN_GROWTH_PER_REQUEST = 500.0
# ... and the fixed one less than this share of the leaky one's growth.
FIXED_MAX_SHARE_OF_LEAKY = 0.10
CULPRIT_FILE = ("app", "main.py")  # where the profile must lead: the end of the file's path

PACKAGE_ROOT = Path(app_package.__file__).resolve().parent.parent  # holds the `app` package
EXIT_STORY_FAILED = 1
EXIT_CANNOT_RUN = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument(
        "--duration",
        type=_positive_float,
        help=f"seconds of load (default: {DEFAULT_DURATION_SECONDS:g})",
    )
    limit.add_argument(
        "--requests", type=positive_int, help="requests to send to each service instead"
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=DEFAULT_CONCURRENCY,
        help="connections to each service (default: %(default)s)",
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        default=DEFAULT_FRAMES,
        help="stack frames traced per allocation (PPROF_TRACEMALLOC_FRAMES; default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(DEFAULT_OUTPUT),
        help="directory for the profiles, chart and numbers (default: ./%(default)s)",
    )


def load_duration(args: argparse.Namespace) -> float | None:
    """Seconds of load, or None when a number of requests was asked for instead."""
    if args.requests:
        return None
    return args.duration or DEFAULT_DURATION_SECONDS


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


# --- Heap profiles: a small reader for the gzipped profile.proto that /debug/pprof/heap serves ---

Frame = tuple[str, str, int]  # (function, file, line)


@dataclass
class HeapSample:
    stack: tuple[Frame, ...]  # leaf first
    bytes: int  # in use


@dataclass
class Heap:
    samples: list[HeapSample]

    def total_bytes(self) -> int:
        return sum(sample.bytes for sample in self.samples)


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a message: varints as int, the rest as bytes."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
            yield number, value
        elif wire_type == 2:
            length, position = _varint(data, position)
            yield number, data[position : position + length]
            position += length
        elif wire_type in (1, 5):  # fixed64, fixed32: profile.proto has none, skip them
            position += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")


def _integers(value: int | bytes) -> list[int]:
    """A repeated int64 field's values: packed (bytes), or one unpacked value."""
    if isinstance(value, int):
        numbers = [value]
    else:
        numbers, position = [], 0
        while position < len(value):
            number, position = _varint(value, position)
            numbers.append(number)
    return [number - (1 << 64) if number >= 1 << 63 else number for number in numbers]


def _scalars(data: bytes) -> dict[int, int]:
    """The integer fields of a message without repeated ones (ValueType, Line, Function)."""
    return {number: value for number, value in _fields(data) if isinstance(value, int)}


def read_heap(gzipped: bytes) -> Heap:
    """The in-use bytes by stack of a heap profile (profile.proto's field numbers)."""
    strings: list[str] = []
    sample_types: list[int] = []  # string index of each value's type
    raw_samples: list[tuple[list[int], list[int]]] = []  # (location ids, values)
    lines_of_location: dict[int, list[tuple[int, int]]] = {}  # id: [(function id, line)]
    functions: dict[int, tuple[int, int]] = {}  # id: (name index, file index)
    for number, value in _fields(gzip.decompress(gzipped)):
        if not isinstance(value, bytes):
            continue  # time, duration, period: not needed here
        if number == 1:  # sample_type
            sample_types.append(_scalars(value).get(1, 0))
        elif number == 2:  # sample
            location_ids: list[int] = []
            values: list[int] = []
            for sub_number, sub_value in _fields(value):
                if sub_number == 1:
                    location_ids += _integers(sub_value)
                elif sub_number == 2:
                    values += _integers(sub_value)
            raw_samples.append((location_ids, values))
        elif number == 4:  # location
            location_id, lines = 0, []
            for sub_number, sub_value in _fields(value):
                if sub_number == 1 and isinstance(sub_value, int):
                    location_id = sub_value
                elif sub_number == 4 and isinstance(sub_value, bytes):  # line, innermost first
                    line = _scalars(sub_value)
                    lines.append((line.get(1, 0), line.get(2, 0)))
            lines_of_location[location_id] = lines
        elif number == 5:  # function
            function = _scalars(value)
            functions[function.get(1, 0)] = (function.get(2, 0), function.get(4, 0))
        elif number == 6:  # string_table
            strings.append(value.decode("utf-8", "replace"))
    types = [strings[index] for index in sample_types]
    if "inuse_space" not in types:
        raise ValueError(f"not a heap profile: its sample types are {types}")
    space = types.index("inuse_space")

    def frames(location_id: int) -> list[Frame]:
        found = []
        for function_id, line in lines_of_location.get(location_id, []):
            name, filename = functions.get(function_id, (0, 0))
            found.append((strings[name], strings[filename], line))
        return found

    samples = [
        HeapSample(tuple(frame for lid in location_ids for frame in frames(lid)), values[space])
        for location_ids, values in raw_samples
    ]
    return Heap(samples)


@dataclass
class TopRow:
    function: str
    flat: int
    cum: int


def top_functions(heap: Heap) -> list[TopRow]:
    """Every function with its flat (allocated in it) and cum (in it or below it) bytes, in
    `pprof -top` order: by flat, then by name."""
    flat: dict[str, int] = {}
    cum: dict[str, int] = {}
    for sample in heap.samples:
        if not sample.stack:
            continue
        leaf = sample.stack[0][0]
        flat[leaf] = flat.get(leaf, 0) + sample.bytes
        for function in {name for name, _, _ in sample.stack}:  # once per stack, even recursive
            cum[function] = cum.get(function, 0) + sample.bytes
    rows = [TopRow(function, flat.get(function, 0), total) for function, total in cum.items()]
    rows.sort(key=lambda row: (-abs(row.flat), row.function, -abs(row.cum)))
    return rows


def kept_functions(heap: Heap) -> list[TopRow]:
    """`top_functions` without those pprof drops by default: cum under 0.5% of the total (pprof
    keeps a node whose cum equals the cutoff, though it prints "Dropped ... (cum <= cutoff)")."""
    cutoff = _node_cutoff(heap.total_bytes())
    return [row for row in top_functions(heap) if abs(row.cum) >= cutoff]


NODE_FRACTION = 0.005  # pprof's default -nodefraction


def _node_cutoff(total: int) -> int:
    return abs(int(total * NODE_FRACTION))


_UNITS = ("B", "kB", "MB", "GB", "TB")


def _unit_for(value: int) -> int:
    """Index in _UNITS of the largest unit that `value` bytes fill at least once (pprof's)."""
    unit = 0
    while unit + 1 < len(_UNITS) and abs(value) >= 1024 ** (unit + 1):
        unit += 1
    return unit


def _pprof_bytes(value: int, unit: int) -> str:
    if value == 0:
        return "0"
    text = f"{value / 1024**unit:.2f}".removesuffix(".00")
    return text + _UNITS[unit]


def _pprof_percent(value: int, total: int) -> str:
    ratio = abs(value / total) * 100 if total else 0.0
    if 99.95 <= ratio <= 100.05:
        return "  100%"
    if ratio >= 1.0:
        return f"{ratio:5.2f}%"
    return f"{ratio:5.2g}%"


def format_top(heap: Heap, count: int) -> str:
    """The first `count` functions as `go tool pprof -top -nodecount=COUNT` prints them, with
    its summary lines: the same nodes dropped, the same unit, the same columns."""
    total = heap.total_bytes()
    every = top_functions(heap)
    kept = kept_functions(heap)
    shown = kept[:count]
    # pprof's unit: the smallest value's, unless that is under 1% of the total's unit
    nonzero = [abs(row.flat) or abs(row.cum) for row in shown if row.flat or row.cum]
    smallest = min(nonzero) if nonzero else total
    unit = _unit_for(smallest)
    if unit != _unit_for(total) and smallest * 100 < total:
        unit = _unit_for(smallest * 100)
    shown_flat = sum(row.flat for row in shown)
    lines = [
        f"Showing nodes accounting for {_pprof_bytes(shown_flat, unit)}, "
        f"{_pprof_percent(shown_flat, total).strip()} of {_pprof_bytes(total, unit)} total"
    ]
    if len(every) > len(kept):
        cutoff = _pprof_bytes(_node_cutoff(total), unit)
        lines.append(f"Dropped {len(every) - len(kept)} nodes (cum <= {cutoff})")
    if len(kept) > len(shown):
        lines.append(f"Showing top {len(shown)} nodes out of {len(kept)}")
    lines.append("      flat  flat%   sum%        cum   cum%")
    running = 0
    for row in shown:
        running += row.flat
        lines.append(
            f"{_pprof_bytes(row.flat, unit):>10} {_pprof_percent(row.flat, total)} "
            f"{_pprof_percent(running, total)} {_pprof_bytes(row.cum, unit):>10} "
            f"{_pprof_percent(row.cum, total)}  {row.function}"
        )
    return "\n".join(lines) + "\n"


@dataclass
class Culprit:
    filename: str  # as the profile names it (the service's absolute path)
    line: int
    source: str
    bytes: int  # allocated inside OpenTelemetry by calls made from this line
    opentelemetry_bytes: int  # allocated inside OpenTelemetry, in all


def find_culprit(heap: Heap) -> Culprit | None:
    """The app/main.py line that most of the memory allocated inside OpenTelemetry was asked
    for from; None when no OpenTelemetry allocation comes from app/main.py."""
    by_line: dict[tuple[str, int], int] = {}
    opentelemetry_bytes = 0
    for sample in heap.samples:
        if not sample.stack or not sample.stack[0][0].startswith("opentelemetry."):
            continue
        opentelemetry_bytes += sample.bytes
        for _, filename, line in sample.stack:  # the innermost app/main.py frame
            if Path(filename).parts[-2:] == CULPRIT_FILE:
                by_line[filename, line] = by_line.get((filename, line), 0) + sample.bytes
                break
    if not by_line:
        return None
    (filename, line), size = max(by_line.items(), key=lambda item: item[1])
    source = linecache.getline(filename, line).strip()
    return Culprit(filename, line, source, size, opentelemetry_bytes)


# --- Services ---


@dataclass
class Service:
    mode: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM to the service's process group, SIGKILL if it lingers; waits for the end."""
        for sent in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sent)  # its own group: start_new_session below
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
                return
            except subprocess.TimeoutExpired:
                continue


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_environment(mode: str, frames: int) -> dict[str, str]:
    env = {
        **os.environ,
        "LEAK_MODE": mode,
        "OTEL_SERVICE_NAME": f"leaker-{mode}",
        "PPROF_ENABLED": "true",
        "PPROF_TRACEMALLOC": "startup",
        "PPROF_TRACEMALLOC_FRAMES": str(frames),
        "PYTHONUNBUFFERED": "1",
    }
    # Traces go to Zipkin only if the user says where it is; otherwise nowhere.
    if env.get("OTEL_EXPORTER_ZIPKIN_ENDPOINT"):
        env["OTEL_TRACES_EXPORTER"] = "zipkin"
        # Spans wait in the batch queue until the next export (every 5 s by default): sooner,
        # and they are gone by the last profile, which comes SETTLE_SECONDS after the load.
        env.setdefault("OTEL_BSP_SCHEDULE_DELAY", str(BATCH_EXPORT_MILLISECONDS))
    else:
        env["OTEL_TRACES_EXPORTER"] = "none"
    return env


def start_service(mode: str, frames: int, output: Path) -> Service:
    """`uvicorn app.main:app` in its own process group, so that stopping it stops all of it and a
    Ctrl-C at the terminal reaches only the demo, which then stops the services itself."""
    port = free_port()
    log_path = output / f"{mode}.log"
    command = [
        sys.executable, "-m", "uvicorn", "app.main:app",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=PACKAGE_ROOT,  # the services run the same `app` as this demo
            env=service_environment(mode, frames),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(mode, f"http://127.0.0.1:{port}", process, log_path)


class ServiceFailed(Exception):
    """A service did not start or did not answer; the message says which and why."""


def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.read()


async def wait_until_ready(service: Service) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while True:
        if service.process.poll() is not None:
            log = service.log_path.read_text(errors="replace").strip()
            raise ServiceFailed(
                f"the {service.mode} service exited with status {service.process.returncode}:\n"
                f"{log}"
            )
        try:
            await asyncio.to_thread(_get, service.url + "/", 1.0)
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ServiceFailed(
                f"the {service.mode} service did not answer within {STARTUP_TIMEOUT_SECONDS:g} s "
                f"(log: {service.log_path})"
            )
        await asyncio.sleep(0.1)


async def fetch_profile(service: Service) -> bytes:
    try:
        return await asyncio.to_thread(
            # gc=1: a full collection first, so that garbage in cycles does not count as in use
            _get,
            service.url + "/debug/pprof/heap?gc=1",
            PROFILE_TIMEOUT_SECONDS,
        )
    except OSError as error:
        raise ServiceFailed(f"the {service.mode} service's heap profile failed: {error}") from error


def resident_bytes(pid: int) -> int | None:
    """The process's resident memory: what `process_resident_memory_bytes` reports on /metrics.

    Read from outside, so that measuring sends the leaky service no requests (each of which
    would leak too): from /proc, or from `ps` where there is no /proc. None if it is gone.
    """
    if os.path.isdir("/proc"):
        return _resident_bytes_from_proc(pid)
    return _resident_bytes_from_ps(pid)


def _resident_bytes_from_proc(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _resident_bytes_from_ps(pid: int) -> int | None:
    try:
        found = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        )
        return int(found.stdout.strip()) * 1024  # ps counts KiB
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


# --- Measuring ---


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
            self.stream.write(self.lines[mode] + "\n")
        self.stream.flush()


async def load_and_sample(
    service: Service, result: ModeResult, args: argparse.Namespace, progress: Progress
) -> LoadResult:
    """The load, with the service's resident memory sampled against the requests served."""

    def on_progress(done: int, errors: int, elapsed: float) -> None:
        rss = resident_bytes(service.pid)
        if rss is not None:
            result.samples.append(Sample(elapsed, done, rss))
        progress.update(service.mode, done, errors, elapsed)

    return await run_load(
        service.url + "/",
        concurrency=args.concurrency,
        requests=args.requests,
        duration=load_duration(args),
        on_progress=on_progress,
        progress_interval=SAMPLE_INTERVAL_SECONDS,
    )


async def measure(
    services: dict[str, Service], args: argparse.Namespace, out: TextIO
) -> tuple[dict[str, ModeResult], dict[str, bytes]]:
    """Warm up, profile, load while sampling memory, profile again: the numbers and profiles."""
    results = {mode: ModeResult(mode, s.pid, s.url) for mode, s in services.items()}
    await asyncio.gather(*(wait_until_ready(s) for s in services.values()))
    print(f"Both answer. Warming up with {WARMUP_REQUESTS} requests each.", file=out, flush=True)
    warm_ups = [
        run_load(s.url + "/", min(args.concurrency, WARMUP_REQUESTS), WARMUP_REQUESTS)
        for s in services.values()
    ]
    await asyncio.gather(*warm_ups)
    print("Taking the first heap profiles.", file=out, flush=True)
    await asyncio.sleep(SETTLE_SECONDS)
    first = await asyncio.gather(*(fetch_profile(s) for s in services.values()))
    for (mode, service), profile in zip(services.items(), first, strict=True):
        results[mode].traced_start_bytes = read_heap(profile).total_bytes()
        rss = resident_bytes(service.pid)
        if rss is not None:
            results[mode].samples.append(Sample(0.0, 0, rss))

    duration = load_duration(args)
    how_much = f"{args.requests} requests each" if duration is None else f"{duration:g} s"
    print(
        f"Loading both at once: {how_much}, {args.concurrency} connections each.",
        file=out,
        flush=True,
    )
    progress = Progress(out, results)
    loads = await asyncio.gather(
        *(load_and_sample(s, results[m], args, progress) for m, s in services.items())
    )
    await asyncio.sleep(SETTLE_SECONDS)
    for (mode, service), load in zip(services.items(), loads, strict=True):
        result = results[mode]
        result.requests, result.errors = load.requests, load.errors
        result.duration_seconds = load.duration_seconds
        rss = resident_bytes(service.pid)
        if rss is not None:
            result.samples.append(Sample(load.duration_seconds, load.requests, rss))

    print("Taking the last heap profiles.", file=out, flush=True)
    last = await asyncio.gather(*(fetch_profile(s) for s in services.values()))
    profiles = dict(zip(services, last, strict=True))
    for mode, profile in profiles.items():
        results[mode].traced_end_bytes = read_heap(profile).total_bytes()
    return results, profiles


# --- Reporting ---


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def _per_request_text(value: float) -> str:
    return "-" if math.isnan(value) else f"{round(value):,} B"  # round: no "-0 B"


def comparison_table(results: dict[str, ModeResult]) -> str:
    measures: list[tuple[str, Callable[[ModeResult], str]]] = [
        ("requests served", lambda r: f"{r.requests:,}"),
        ("errors", lambda r: f"{r.errors:,}"),
        ("requests/s", lambda r: f"{r.requests_per_second():.1f}"),
        ("RSS at start", lambda r: _mib(r.rss_start_bytes)),
        ("RSS at end", lambda r: _mib(r.rss_end_bytes)),
        ("RSS growth/request", lambda r: _per_request_text(r.rss_growth_per_request())),
        ("traced heap at start", lambda r: _mib(r.traced_start_bytes)),
        ("traced heap at end", lambda r: _mib(r.traced_end_bytes)),
        ("traced growth/request", lambda r: _per_request_text(r.traced_growth_per_request())),
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


def verdict(results: dict[str, ModeResult], culprit: Culprit | None) -> list[str]:
    """What did not go as the story says; empty when it held."""
    problems = []
    leaky, fixed = results["leaky"], results["fixed"]
    for result in (leaky, fixed):
        if result.requests == 0:
            problems.append(f"the {result.mode} service served no requests")
    leaky_growth = leaky.traced_growth_per_request()
    fixed_growth = fixed.traced_growth_per_request()
    if not leaky_growth >= LEAKY_MIN_GROWTH_PER_REQUEST:  # also catches nan
        problems.append(
            f"the leaky service's traced heap grew {_per_request_text(leaky_growth)}/request, "
            f"less than the {LEAKY_MIN_GROWTH_PER_REQUEST:.0f} B/request the leak should keep"
        )
    elif not fixed_growth < FIXED_MAX_SHARE_OF_LEAKY * leaky_growth:
        problems.append(
            f"the fixed service's traced heap grew {_per_request_text(fixed_growth)}/request, "
            f"not under {FIXED_MAX_SHARE_OF_LEAKY:.0%} of the leaky service's "
            f"{_per_request_text(leaky_growth)}/request"
        )
    if culprit is None:
        problems.append(
            "the leaky heap profile has no OpenTelemetry allocation made from app/main.py"
        )
    return problems


def _relative(filename: str) -> str:
    path = Path(filename)
    return str(path.relative_to(PACKAGE_ROOT)) if path.is_relative_to(PACKAGE_ROOT) else filename


def report(
    results: dict[str, ModeResult],
    heap: Heap,
    culprit: Culprit | None,
    output: Path,
    out: TextIO,
) -> None:
    def say(text: str = "") -> None:
        print(text, file=out)

    leaky_profile = output / "leaky.heap.pb.gz"
    say("\nMemory at the start and end of the load (traced heap: the live blocks tracemalloc")
    say("traces, the heap profile's total; RSS: resident memory, process_resident_memory_bytes):")
    say(comparison_table(results))
    say(f"\nResident memory against requests served, sampled every {SAMPLE_INTERVAL_SECONDS:g} s:")
    say(chart.terminal_chart(memory_series(results), "requests served", "MiB", y_format=_one_digit))

    say(f"The leaky service's heap profile, {leaky_profile}, by function, as")
    say(f"`go tool pprof -top -nodecount={TOP_FUNCTIONS}` shows it:")
    say(format_top(heap, TOP_FUNCTIONS))
    if culprit is not None:
        share = culprit.bytes / culprit.opentelemetry_bytes if culprit.opentelemetry_bytes else 0.0
        say(f"The leak: {share:.0%} of the memory allocated inside OpenTelemetry was asked for")
        say(f"from this line, {_relative(culprit.filename)}:{culprit.line}:")
        say(f"\n    {culprit.line} | {culprit.source}\n")
    say("Dig further with Go's pprof (`go tool pprof`, or `pprof` from github.com/google/pprof):")
    say(f"    go tool pprof -http=:8081 {leaky_profile}")
    say(f"    go tool pprof -top -lines -focus=OpenTelemetryMiddleware {leaky_profile}")
    say(f"    go tool pprof -top -nodefraction=0 {leaky_profile}")
    say(f"    go tool pprof -top -focus=OpenTelemetryMiddleware {output / 'fixed.heap.pb.gz'}")
    say()


def _one_digit(value: float) -> str:
    return f"{value:.1f}"


def write_summary(
    path: Path,
    args: argparse.Namespace,
    results: dict[str, ModeResult],
    culprit: Culprit | None,
    heap: Heap,
    problems: list[str],
) -> None:
    summary = {
        "story_held": not problems,
        "problems": problems,
        "thresholds": {
            "leaky_min_traced_growth_per_request": LEAKY_MIN_GROWTH_PER_REQUEST,
            "fixed_max_share_of_leaky": FIXED_MAX_SHARE_OF_LEAKY,
        },
        "load": {
            "requests": args.requests,
            "duration_seconds": load_duration(args),
            "concurrency": args.concurrency,
            "warmup_requests": WARMUP_REQUESTS,
            "frames": args.frames,
        },
        "modes": {mode: result.to_json() for mode, result in results.items()},
        "culprit": None
        if culprit is None
        else {**asdict(culprit), "file": _relative(culprit.filename)},
        "top": [asdict(row) for row in kept_functions(heap)[:TOP_FUNCTIONS]],
        "leaky_profile_total_bytes": heap.total_bytes(),
        "files": ["leaky.heap.pb.gz", "fixed.heap.pb.gz", "memory.svg", "leaky.log", "fixed.log"],
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


# --- Running it all ---


async def _demo(
    args: argparse.Namespace, output: Path, services: dict[str, Service], out: TextIO
) -> int:
    interrupted_by: list[int] = []
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()

    def interrupt(signum: int) -> None:
        interrupted_by.append(signum)
        main_task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt, signum)
    try:
        for mode in MODES:
            services[mode] = start_service(mode, args.frames, output)
            print(
                f"Started the {mode} service: pid {services[mode].pid}, {services[mode].url} "
                f"(LEAK_MODE={mode}, log: {services[mode].log_path})",
                file=out,
                flush=True,
            )
        zipkin = os.environ.get("OTEL_EXPORTER_ZIPKIN_ENDPOINT")
        if zipkin:
            print(f"Traces go to Zipkin at {zipkin}.", file=out)
        else:
            print("Traces are not exported (OTEL_EXPORTER_ZIPKIN_ENDPOINT is not set).", file=out)
        results, profiles = await measure(services, args, out)
    except asyncio.CancelledError:
        if not interrupted_by:
            raise
        name = signal.Signals(interrupted_by[0]).name
        print(f"\nleaker demo: {name}: stopping the services.", file=sys.stderr)
        return 128 + interrupted_by[0]
    except (ServiceFailed, TargetUnreachable) as error:
        print(f"leaker demo: {error}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    finally:
        for service in services.values():
            service.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    print("Stopped both services.", file=out)
    return conclude(args, output, results, profiles, out)


def conclude(
    args: argparse.Namespace,
    output: Path,
    results: dict[str, ModeResult],
    profiles: dict[str, bytes],
    out: TextIO,
) -> int:
    """Report, save the profiles, chart and numbers, and judge whether the story held."""
    for mode, profile in profiles.items():
        (output / f"{mode}.heap.pb.gz").write_bytes(profile)
    heap = read_heap(profiles["leaky"])
    culprit = find_culprit(heap)
    report(results, heap, culprit, output, out)
    chart_svg = chart.svg_chart(
        memory_series(results),
        "Resident memory against requests served",
        "requests served",
        "resident memory (MiB)",
    )
    (output / "memory.svg").write_text(chart_svg)
    problems = verdict(results, culprit)
    write_summary(output / "demo.json", args, results, culprit, heap, problems)
    print(
        f"Saved in {output}{os.sep}: leaky.heap.pb.gz and fixed.heap.pb.gz (the last profiles), "
        "memory.svg (the chart), demo.json (the numbers), leaky.log and fixed.log.",
        file=out,
    )
    if problems:
        print("\nThe story did not hold:", file=out)
        for problem in problems:
            print(f"  - {problem}", file=out)
        print("A longer load (--duration, --requests) makes the growth easier to see.", file=out)
        return EXIT_STORY_FAILED
    assert culprit is not None  # verdict() requires it
    print(
        f"\nThe story held: leaky kept "
        f"{_per_request_text(results['leaky'].traced_growth_per_request())} per request, fixed "
        f"{_per_request_text(results['fixed'].traced_growth_per_request())}, and the profile "
        f"names {_relative(culprit.filename)}:{culprit.line}.",
        file=out,
    )
    return 0


def run(args: argparse.Namespace) -> int:
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    services: dict[str, Service] = {}
    started = time.monotonic()
    try:
        status = asyncio.run(_demo(args, output, services, sys.stdout))
    except KeyboardInterrupt:  # a Ctrl-C after the services stopped, while reporting
        status = 128 + signal.SIGINT
    finally:
        for service in services.values():  # already stopped unless something unexpected failed
            service.stop()
    print(f"leaker demo: done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return status
