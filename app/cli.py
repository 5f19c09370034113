"""The `leaker` command: `serve` the service, `load` it, or run the `demo`.

`pip install -e .` installs it as `leaker`; without that, run `python -m app.cli`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import TextIO

from app.arguments import non_negative_float, positive_int
from app.load import LoadResult, ProgressCallback, TargetUnreachable, run_load

PIPED_PROGRESS_SECONDS = 5.0  # without a terminal, a progress line this often keeps logs short
EXIT_INTERRUPTED = 130  # the shell's convention for "stopped by SIGINT"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leaker", description="A Python reproduction of Form3's Go memory-leak demo."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service with uvicorn")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8080, help="port to bind (default: %(default)s)")
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log every request (off by default: at load it costs more CPU than the requests)",
    )

    load = commands.add_parser("load", help="send GET requests from keep-alive connections")
    load.add_argument("--url", required=True, help="http:// URL to request")
    load.add_argument(
        "--concurrency", type=positive_int, default=100, help="connections (default: %(default)s)"
    )
    limit = load.add_mutually_exclusive_group()
    limit.add_argument("--requests", type=positive_int, help="stop after this many requests")
    limit.add_argument(
        "--duration", type=non_negative_float, help="stop after this many seconds (0: Ctrl-C)"
    )

    # The demo's options belong to app.demo, imported only when the demo runs.
    commands.add_parser("demo", help="run the leak demo (see `leaker demo --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "demo":
        return demo(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "serve":
        return serve(args.host, args.port, args.access_log)
    return load(args.url, args.concurrency, args.requests, args.duration or None)


def serve(host: str, port: int, access_log: bool) -> int:
    from app import server
    from app.settings import Settings, SettingsError

    try:  # checked here too, so a bad setting is one clear line rather than uvicorn's import error
        Settings.from_environ()
    except SettingsError as error:
        print(f"leaker: invalid setting: {error}", file=sys.stderr)
        return 1
    server.run(host, port, access_log)
    return 0


def load(url: str, concurrency: int, requests: int | None, duration: float | None) -> int:
    progress = ProgressLine(sys.stderr)
    try:
        result, interrupted = asyncio.run(
            _load_until_interrupted(url, concurrency, requests, duration, progress.update)
        )
    except TargetUnreachable as error:
        print(f"leaker load: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # a URL we cannot load, such as https://
        print(f"leaker load: {error}", file=sys.stderr)
        return 2
    except asyncio.CancelledError:  # Ctrl-C during the reachability check: nothing to sum up
        print("leaker load: interrupted before the load started", file=sys.stderr)
        return EXIT_INTERRUPTED
    progress.finish()
    print(result.summary())
    return EXIT_INTERRUPTED if interrupted else 0


async def _load_until_interrupted(
    url: str,
    concurrency: int,
    requests: int | None,
    duration: float | None,
    on_progress: ProgressCallback,
) -> tuple[LoadResult, bool]:
    """Run the load; Ctrl-C ends it early, and the result still comes back."""
    interrupted = False
    task = asyncio.create_task(run_load(url, concurrency, requests, duration, on_progress))

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        return await task, interrupted
    finally:
        loop.remove_signal_handler(signal.SIGINT)


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
