"""The /debug/pprof/ index page, as Go's net/http/pprof lays it out: each profile this process
can provide, with a count and a description; with PPROF_MULTIPROC_DIR, the workers that answer
together."""

from __future__ import annotations

import html
import tracemalloc
from pathlib import Path

from asgi_pprof import cpu, goroutine, sampled_profile, sampling
from asgi_pprof.asgi import Answer


def page(default_window_seconds: int, workers: tuple[Path, list[int]] | None = None) -> Answer:
    """The index; `workers`: the multiprocess directory and the pids of its sockets."""
    profiles = _profiles(default_window_seconds)
    if sampling.is_running():
        profiles = sampled_profile.index_entries(profiles)
    rows = "".join(
        f"<tr><td>{html.escape(count)}</td><td><a href='{name}?debug=1'>{name}</a></td></tr>\n"
        for name, count, _ in profiles
    )
    descriptions = "".join(
        f"<li><div class=profile-name>{name}: </div> {html.escape(text)}</li>\n"
        for name, _, text in profiles
    )
    together = ""
    if workers is not None:
        directory, pids = workers
        together = (
            f"<p>heap, allocs, goroutine and profile answer for every worker of "
            f"{html.escape(str(directory))} (PPROF_MULTIPROC_DIR), merged, each sample labelled "
            f"with its pid: {' '.join(map(str, pids))}. The counts above are this worker's.</p>"
        )
    text = _INDEX_PAGE.format(rows=rows, descriptions=descriptions, workers=together)
    return Answer(200, text.encode(), "text/html; charset=utf-8")


def _profiles(default_window_seconds: int) -> list[tuple[str, str, str]]:
    """(name, count, description) for each profile this process can really provide, by name.

    As in Go: the profiles and cmdline; symbol is a service for pprof, not listed.
    """
    if tracemalloc.is_tracing():
        traced = tracemalloc.get_traced_memory()[0]
        count = f"{traced / 2**20:.1f} MiB"
        status = (
            f"Tracing now, {tracemalloc.get_traceback_limit()} frames deep: heap shows every "
            "live block allocated since tracing started."
        )
    else:
        count = "off"
        status = (
            "Not tracing now: heap opens a window (seconds=N, default "
            f"{default_window_seconds}) that traces while it lasts."
        )
    return [
        (
            "cmdline",
            "0",  # as in Go: not a count profile
            "The command line invocation of the current program: the interpreter, its "
            "options, the script and its arguments.",
        ),
        (
            "goroutine",
            str(goroutine.count()),
            "Stack traces of all current threads and pending asyncio tasks (of every event "
            "loop): Python's goroutines. Specify seconds=N for the growth over N seconds.",
        ),
        (
            "heap",
            count,
            "Live memory by allocating stack, from tracemalloc: exact, not sampled. Specify "
            "the gc GET parameter to collect garbage first, seconds=N for the growth over N "
            f"seconds. {status}",
        ),
        (
            "profile",
            "1" if cpu.in_use() else "0",
            "CPU profile. You can specify the duration in the seconds GET parameter. After "
            "you get the profile file, use the go tool pprof command to investigate the "
            "profile. Sampled at 100 Hz of CPU time; one at a time (the count is 1 while "
            "one is being taken).",
        ),
    ]


_INDEX_PAGE = """<html>
<head>
<title>/debug/pprof/</title>
<style>
.profile-name{{
\tdisplay:inline-block;
\twidth:6rem;
}}
</style>
</head>
<body>
/debug/pprof/<br>
<br>
Types of profiles available:
<table>
<thead><td>Count</td><td>Profile</td></thead>
{rows}</table>
<a href="goroutine?debug=2">full goroutine stack dump</a>
<br>
<p>
Profile Descriptions:
<ul>
{descriptions}</ul>
</p>
{workers}
<p>Read them with <code>go tool pprof http://HOST/debug/pprof/heap</code>. Keep these endpoints off
public networks: they show file paths and the shapes of this service's memory.</p>
</body>
</html>
"""
