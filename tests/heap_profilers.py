"""The heap profiler configurations that the benchmarks compare, started in-process or as services.

`none` is the service as it runs by default, endpoints mounted and nothing traced; `sampling
512 KiB` is Go's default rate; tracemalloc from startup at 1 and 8 frames is what the tracemalloc
backend costs while it traces.
"""

from __future__ import annotations

import tracemalloc

import asgi_pprof

# name: (the service's environment, how to start it in-process)
CONFIGURATIONS: dict[str, dict[str, str]] = {
    "none": {},
    "sampling 512 KiB": {"PPROF_HEAP_PROFILER": "sampling", "PPROF_MEM_PROFILE_RATE": "524288"},
    "sampling 64 KiB": {"PPROF_HEAP_PROFILER": "sampling", "PPROF_MEM_PROFILE_RATE": "65536"},
    # sampling at 512 KiB, with each sample's labels: the route's and method's (LabelMiddleware)
    # and the thread's; `sampling 512 KiB` has none of them.
    "labels": {
        "PPROF_HEAP_PROFILER": "sampling",
        "PPROF_MEM_PROFILE_RATE": "524288",
        "PPROF_LABELS": "true",
    },
    "tracemalloc 1 frame": {"PPROF_TRACEMALLOC": "startup", "PPROF_TRACEMALLOC_FRAMES": "1"},
    "tracemalloc 8 frames": {"PPROF_TRACEMALLOC": "startup", "PPROF_TRACEMALLOC_FRAMES": "8"},
}


def start(name: str) -> None:
    """Start configuration `name` in this process."""
    env = CONFIGURATIONS[name]
    if env.get("PPROF_HEAP_PROFILER") == "sampling":
        labels = env.get("PPROF_LABELS") == "true"
        asgi_pprof.start_sampling(rate=int(env["PPROF_MEM_PROFILE_RATE"]), threads=labels)
    elif "PPROF_TRACEMALLOC_FRAMES" in env:
        tracemalloc.start(int(env["PPROF_TRACEMALLOC_FRAMES"]))


def allocate(iterations: int) -> None:
    """A pure allocation workload: small lists, dicts, strings and buffers made and dropped, as a
    request's code makes them; six blocks an iteration, nothing else done with them."""
    for index in range(iterations):
        items = [None] * 8
        mapping = {"key": index}
        text = "x" * (index % 64)
        buffer = bytearray(100)
        del items, mapping, text, buffer
