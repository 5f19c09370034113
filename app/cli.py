"""The `leaker` command: `serve` the service, `load` it, or run the `demo`.

`pip install -e .` installs it as `leaker`; without that, run `python -m app.cli`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import textwrap
from typing import TextIO

from app import server
from app.arguments import non_negative_float, port_number, positive_float, positive_int
from app.load import (
    REQUEST_TIMEOUT_SECONDS,
    TARGET_GONE_SECONDS,
    LoadResult,
    ProgressCallback,
    TargetUnreachable,
    run_load,
)
from app.settings import ENVIRONMENT_VARIABLES, Settings, SettingsError

PIPED_PROGRESS_SECONDS = 5.0  # without a terminal, a progress line this often keeps logs short
EXIT_FAILED = 1  # the load could not run, or ran without a single success
EXIT_USAGE = 2  # argparse's status for bad arguments
STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # each ends the load with its summary
HELP_WIDTH = 79

LOAD_DESCRIPTION = """\
Send GET requests to --url from --concurrency keep-alive connections, then
print a summary. Without --requests or --duration it runs until Ctrl-C (or
SIGTERM), which also prints the summary. A request without an answer within
{timeout:g} s counts as an error. The run stops early when the target has
answered nothing for {gone:g} s and cannot be connected to."""

LOAD_EXIT_STATUSES = """\
exit status:
  0    the load ran to its end and at least one request got a 2xx answer
  1    the target could not be reached, went away during the run, or no
       request got a 2xx answer
  2    bad arguments
  130  stopped by Ctrl-C (SIGINT), after printing the summary
  143  stopped by SIGTERM, after printing the summary"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leaker", description="A Python reproduction of Form3's Go memory-leak demo."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the service with uvicorn",
        description="Run the service (app.main:app) with uvicorn, configured by the environment.",
        epilog=_environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.set_defaults(parser=serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument(
        "--port",
        type=port_number,
        default=8080,
        help="port to bind, 0 for any free one (default: %(default)s)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log every request (off by default: at load it costs more CPU than the requests)",
    )
    serve.add_argument(
        "--header-timeout",
        type=positive_float,
        default=server.HEADER_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="close a connection whose request line and headers have not all arrived within "
        "this time, answering 408 if some have (default: %(default)g)",
    )

    load = commands.add_parser(
        "load",
        help="send GET requests from keep-alive connections",
        description=LOAD_DESCRIPTION.format(
            timeout=REQUEST_TIMEOUT_SECONDS, gone=TARGET_GONE_SECONDS
        ),
        epilog=LOAD_EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load.set_defaults(parser=load)
    load.add_argument(
        "--url",
        required=True,
        help="http:// URL to request; {n} in its path becomes each request's number (1, 2, ...), "
        "so that each asks for a path of its own: /orders/{n}",
    )
    load.add_argument(
        "--concurrency", type=positive_int, default=100, help="connections (default: %(default)s)"
    )
    limit = load.add_mutually_exclusive_group()
    limit.add_argument("--requests", type=positive_int, help="stop after this many requests")
    limit.add_argument(
        "--duration",
        type=non_negative_float,
        help="stop after this many seconds; requests still in flight then are cut short and not "
        "counted (0: until Ctrl-C)",
    )

    # The demo's options belong to app.demo, imported only when the demo runs.
    commands.add_parser("demo", help="run the leak demo (see `leaker demo --help`)", add_help=False)
    return parser


def _environment_help() -> str:
    width = max(len(name) for name in ENVIRONMENT_VARIABLES)
    indent = " " * (width + 4)
    lines = ["environment variables (read at startup; a bad value stops the service):"]
    for name, text in ENVIRONMENT_VARIABLES.items():
        wrapped = textwrap.wrap(text, HELP_WIDTH - len(indent)) or [""]
        lines.append(f"  {name:<{width}}  {wrapped[0]}")
        lines.extend(indent + line for line in wrapped[1:])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["demo"]:  # the demo parses its own options
        return demo(arguments[1:])
    args, extra = build_parser().parse_known_args(arguments)
    if extra:  # argparse would show the top-level usage: the command's is the one that helps
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "serve":
        return serve(args.host, args.port, args.access_log, args.header_timeout)
    return load(args.url, args.concurrency, args.requests, args.duration or None)


def serve(host: str, port: int, access_log: bool, header_timeout: float) -> int:
    try:  # checked here too, so a bad setting is one clear line rather than uvicorn's import error
        settings = Settings.from_environ()
    except SettingsError as error:
        print(f"leaker: invalid setting: {error}", file=sys.stderr)
        return 1
    print(f"leaker serve: {settings.describe()}", file=sys.stderr, flush=True)
    server.run(host, port, access_log, header_timeout)
    return 0


def load(url: str, concurrency: int, requests: int | None, duration: float | None) -> int:
    progress = ProgressLine(sys.stderr)
    try:
        result, stopped_by = asyncio.run(
            _load_until_signalled(url, concurrency, requests, duration, progress.update)
        )
    except TargetUnreachable as error:
        print(f"leaker load: {error}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as error:  # a URL we cannot load, such as https://
        print(f"leaker load: {error}", file=sys.stderr)
        return EXIT_USAGE
    except _Signalled as signalled:  # during the reachability check: nothing to sum up
        print("leaker load: interrupted before the load started", file=sys.stderr)
        return 128 + signalled.signal_number
    progress.finish()
    print(result.summary())
    if stopped_by is not None:
        return 128 + stopped_by  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    if result.stop_reason is not None:
        print(f"leaker load: stopped early: {result.stop_reason}", file=sys.stderr)
        return EXIT_FAILED
    if result.successes() == 0:
        print("leaker load: no request got a 2xx answer", file=sys.stderr)
        return EXIT_FAILED
    return 0


class _Signalled(Exception):
    def __init__(self, signal_number: int) -> None:
        super().__init__(f"stopped by signal {signal_number}")
        self.signal_number = signal_number


async def _load_until_signalled(
    url: str,
    concurrency: int,
    requests: int | None,
    duration: float | None,
    on_progress: ProgressCallback,
) -> tuple[LoadResult, int | None]:
    """Run the load; Ctrl-C or SIGTERM ends it early, and the result still comes back.

    Returns the result and the number of the signal that stopped it, if one did.
    """
    stopped_by: int | None = None
    task = asyncio.create_task(run_load(url, concurrency, requests, duration, on_progress))

    def stop(signal_number: int) -> None:
        nonlocal stopped_by
        stopped_by = signal_number
        task.cancel()

    loop = asyncio.get_running_loop()
    for signal_number in STOPPING_SIGNALS:
        loop.add_signal_handler(signal_number, stop, signal_number)
    try:
        return await task, stopped_by
    except asyncio.CancelledError:
        if stopped_by is None:
            raise
        raise _Signalled(stopped_by) from None
    finally:
        for signal_number in STOPPING_SIGNALS:
            loop.remove_signal_handler(signal_number)


class ProgressLine:
    """One live line on a terminal (rewritten with \\r); a line every few seconds otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.shown_done = 0
        self.shown_elapsed = 0.0
        self.written = False

    def update(self, done: int, errors: int, elapsed: float) -> None:
        if not self.live and elapsed - self.shown_elapsed < PIPED_PROGRESS_SECONDS:
            return
        interval = elapsed - self.shown_elapsed
        rate = (done - self.shown_done) / interval if interval > 0 else 0.0
        self.shown_done, self.shown_elapsed = done, elapsed
        line = f"{elapsed:7.1f} s  {done:9d} requests  {errors:6d} errors  {rate:8.1f} req/s now"
        self.stream.write("\r" + line if self.live else line + "\n")
        self.stream.flush()
        self.written = True

    def finish(self) -> None:
        if self.live and self.written:
            self.stream.write("\n")
            self.stream.flush()


def demo(argv: list[str]) -> int:
    try:
        from app import demo as demo_module
    except ImportError as error:
        print(f"leaker: demo not available ({error})", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="leaker demo", description=demo_module.__doc__)
    demo_module.add_arguments(parser)
    return demo_module.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
