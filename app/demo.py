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
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from app import chart
from app.arguments import positive_float, positive_int
from app.demo_report import (
    NEXT_STEPS,
    SAMPLE_INTERVAL_SECONDS,
    TOP_FUNCTIONS,
    ModeResult,
    Progress,
    Sample,
    memory_series,
    per_request_text,
    relative,
    report,
)
from app.demo_services import (
    Service,
    ServiceFailed,
    fetch_profile,
    resident_bytes,
    start_service,
    wait_until_ready,
)
from app.load import LoadResult, TargetUnreachable, run_load
from app.settings import Settings
from asgi_pprof.reader import Line, Profile, kept_functions, read_profile, top_line

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

# The story holds when the leaky service keeps at least this much traced heap per request ...
LEAKY_MIN_GROWTH_PER_REQUEST = 500.0
# ... and the fixed one less than this share of the leaky one's growth.
FIXED_MAX_SHARE_OF_LEAKY = 0.10
CULPRIT_FILE = "app/main.py"  # where the profile must lead: the end of the file's path
CULPRIT_LEAF = "opentelemetry."  # ...from memory allocated inside OpenTelemetry

EXIT_STORY_FAILED = 1
EXIT_CANNOT_RUN = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument(
        "--duration",
        type=positive_float,
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


def find_culprit(heap: Profile) -> Line | None:
    """The app/main.py line that most of the memory allocated inside OpenTelemetry was asked
    for from; None when no OpenTelemetry allocation comes from app/main.py."""
    return top_line(heap, CULPRIT_FILE, CULPRIT_LEAF, "inuse_space")


def verdict(results: dict[str, ModeResult], culprit: Line | None) -> list[str]:
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
            f"the leaky service's traced heap grew {per_request_text(leaky_growth)}/request, "
            f"less than the {LEAKY_MIN_GROWTH_PER_REQUEST:.0f} B/request the leak should keep"
        )
    elif not fixed_growth < FIXED_MAX_SHARE_OF_LEAKY * leaky_growth:
        problems.append(
            f"the fixed service's traced heap grew {per_request_text(fixed_growth)}/request, "
            f"not under {FIXED_MAX_SHARE_OF_LEAKY:.0%} of the leaky service's "
            f"{per_request_text(leaky_growth)}/request"
        )
    if culprit is None:
        problems.append(
            "the leaky heap profile has no OpenTelemetry allocation made from app/main.py"
        )
    return problems


# --- Measuring ---


async def load_and_sample(
    service: Service, result: ModeResult, args: argparse.Namespace, progress: Progress
) -> LoadResult:
    """The load, with the service's resident memory sampled against the requests served."""

    def on_progress(done: int, errors: int, elapsed: float) -> None:
        rss = resident_bytes(service.pid)
        if rss is not None:
            result.samples.append(Sample(elapsed, done, rss))
        progress.update(service.mode, done, errors, elapsed)

    load = await run_load(
        service.url + "/",
        concurrency=args.concurrency,
        requests=args.requests,
        duration=load_duration(args),
        on_progress=on_progress,
        progress_interval=SAMPLE_INTERVAL_SECONDS,
    )
    progress.finish(service.mode)
    return load


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
        results[mode].traced_start_bytes = read_profile(profile).total("inuse_space")
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
        results[mode].traced_end_bytes = read_profile(profile).total("inuse_space")
    return results, profiles


def write_summary(
    path: Path,
    args: argparse.Namespace,
    results: dict[str, ModeResult],
    culprit: Line | None,
    heap: Profile,
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
        else {**asdict(culprit), "file": relative(culprit.filename)},
        "top": [asdict(row) for row in kept_functions(heap)[:TOP_FUNCTIONS]],
        "leaky_profile_total_bytes": heap.total("inuse_space"),
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
    heap = read_profile(profiles["leaky"])
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
        print(NEXT_STEPS, file=out)
        return EXIT_STORY_FAILED
    assert culprit is not None  # verdict() requires it
    print(
        f"\nThe story held: leaky kept "
        f"{per_request_text(results['leaky'].traced_growth_per_request())} per request, fixed "
        f"{per_request_text(results['fixed'].traced_growth_per_request())}, and the profile "
        f"names {relative(culprit.filename)}:{culprit.line}.",
        file=out,
    )
    print(NEXT_STEPS, file=out)
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
