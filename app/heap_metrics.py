"""The sampled live heap on /metrics: Python's counterpart of Go's go_memstats_heap_alloc_bytes.

The Go leaker's README graphs go_memstats_heap_alloc_bytes, the heap bytes allocated and still
in use. With the sampling heap profiler running, the same estimate is at hand: the in-use bytes of
its samples, unsampled as /debug/pprof/heap's inuse_space total is, a counter that the sampler
keeps as blocks come and go (`sampling.estimated_inuse_bytes()`: no capture, nothing to wait for).
Beside it, the profiler's own cost and bound: the C memory of its tables
(python_heap_profiler_own_bytes, at most PPROF_MEM_PROFILE_MAX_BYTES) and the samples it counted
in its one "table full" record once that bound was reached (python_heap_profiler_table_full_samples:
above zero, the heap profile has lost stacks, and the bound wants raising).

- One process: read at each scrape.
- Several workers, in prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR set, as
  prometheus_client asks of services run by `uvicorn --workers N` or gunicorn): a scrape reaches
  one worker, which must answer for all, so each worker writes its own value into the directory,
  from a thread, every UPDATE_SECONDS, and /metrics reads them all. The gauge's mode is `liveall`:
  one series per live worker, labelled `pid` (a leak in one worker shows as one rising line;
  `sum()` is the service's), and the files of workers that have exited are removed by the others
  (prometheus_client's `mark_process_dead`, which uvicorn has no hook to call), so that nothing
  grows with restarts.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, Gauge, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.settings import SettingsError
from asgi_pprof import sampling

HEAP_INUSE_METRIC = "python_heap_inuse_bytes"
HEAP_INUSE_HELP = (
    "Bytes of live PyMem/PyObject blocks, estimated by the sampling heap profiler "
    "(inuse_space of /debug/pprof/heap); Go's go_memstats_heap_alloc_bytes."
)
OWN_BYTES_METRIC = "python_heap_profiler_own_bytes"
TABLE_FULL_METRIC = "python_heap_profiler_table_full_samples"
GAUGES: dict[str, str] = {
    HEAP_INUSE_METRIC: HEAP_INUSE_HELP,
    OWN_BYTES_METRIC: (
        "C memory of the sampling heap profiler's tables (at most PPROF_MEM_PROFILE_MAX_BYTES)."
    ),
    TABLE_FULL_METRIC: (
        "Samples since start counted in the sampler's one 'table full' record, their stacks "
        "lost: the tables had reached PPROF_MEM_PROFILE_MAX_BYTES."
    ),
}


def gauge_values() -> dict[str, float]:
    """Each gauge's value now: one read of the sampler's counters for the two of its own."""
    stats = sampling.stats()
    return {
        HEAP_INUSE_METRIC: sampling.estimated_inuse_bytes(),
        OWN_BYTES_METRIC: float(stats.get("own_bytes", 0)),
        TABLE_FULL_METRIC: float(stats.get("table_full", 0)),
    }


MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
UPDATE_SECONDS = 1.0  # how stale a worker's value may be: scrapes come every 15 s or so
_LIVE_FILE = re.compile(r"gauge_live[a-z]+_([0-9]+)\.db")


class SampledHeapCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not sampling.is_running():
            return
        for name, value in gauge_values().items():
            yield GaugeMetricFamily(name, GAUGES[name], value=value)


_registered_in: int | None = None  # the pid that registered: a forked worker registers anew


def register_heap_metrics() -> None:
    """Add the gauges to the default registry, once per process: read at each scrape, or in
    multiprocess mode written by each worker and read from all of them."""
    global _registered_in
    if _registered_in == os.getpid():
        return
    directory = os.environ.get(MULTIPROC_VARIABLE, "")
    if directory:
        _register_multiprocess(_checked(directory))
    elif _registered_in is None:
        REGISTRY.register(SampledHeapCollector())
    _registered_in = os.getpid()


def _checked(value: str) -> Path:
    directory = Path(value)
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        raise SettingsError(
            f"{MULTIPROC_VARIABLE}={value!r} is not an existing directory this process can "
            "write: create it before the workers start (prometheus_client's multiprocess mode), "
            "or unset it"
        )
    return directory


def _register_multiprocess(directory: Path) -> None:
    # Not in the default registry itself: the registry's MultiProcessCollector reads every
    # worker's value, this worker's included, from the directory.
    gauges = {
        name: Gauge(name, documentation, multiprocess_mode="liveall", registry=None)
        for name, documentation in GAUGES.items()
    }
    _set(gauges)
    if _registered_in is None:  # once per registry: a forked copy inherits the parent's
        multiprocess.MultiProcessCollector(REGISTRY)
    threading.Thread(
        target=_keep_current,
        args=(gauges, directory),
        name="leaker: python_heap_inuse_bytes",
        daemon=True,
    ).start()


def _set(gauges: dict[str, Gauge]) -> None:
    for name, value in gauge_values().items():
        gauges[name].set(value)


def _keep_current(gauges: dict[str, Gauge], directory: Path) -> None:
    """Write this worker's values every UPDATE_SECONDS (C counters read, mmap writes: the GIL
    for microseconds), and remove the files of workers that have exited."""
    while True:
        _set(gauges)
        forget_exited_workers(directory)
        time.sleep(UPDATE_SECONDS)


def forget_exited_workers(directory: Path) -> None:
    """prometheus_client's mark_process_dead for each live-mode file of a process that is gone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _LIVE_FILE.fullmatch(name)
        if match and not _alive(int(match[1])):
            try:
                multiprocess.mark_process_dead(int(match[1]), str(directory))
            except FileNotFoundError:  # another worker removed it first
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
