"""The sampled live heap on /metrics: Python's counterpart of Go's go_memstats_heap_alloc_bytes.

The Go leaker's README graphs go_memstats_heap_alloc_bytes, the heap bytes allocated and still
in use. With the sampling heap profiler running, the same estimate is at hand: the in-use bytes of
its samples, unsampled as /debug/pprof/heap's inuse_space total is. Read at each scrape (a
snapshot of a few thousand records: milliseconds).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from asgi_pprof import sampling

HEAP_INUSE_METRIC = "python_heap_inuse_bytes"


class SampledHeapCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not sampling.is_running():
            return
        yield GaugeMetricFamily(
            HEAP_INUSE_METRIC,
            "Bytes of live PyMem/PyObject blocks, estimated by the sampling heap profiler "
            "(inuse_space of /debug/pprof/heap); Go's go_memstats_heap_alloc_bytes.",
            value=sampling.estimated_inuse_bytes(),
        )


_registered = False


def register_heap_metrics() -> None:
    """Add the gauge to the default registry, once per process."""
    global _registered
    if not _registered:
        REGISTRY.register(SampledHeapCollector())
        _registered = True
