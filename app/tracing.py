"""Tracing to Zipkin: an SDK tracer provider, a bounded batch queue, the Zipkin JSON exporter.

While Zipkin is down the batch processor drops spans from its bounded queue; the exporter below
turns each failed export into a result instead of a traceback, and logs once a minute at most,
with the reason: the Zipkin exporter's own line for each failed batch is held back for that, and
so is the batch processor's "Queue full, dropping Span." (every 20 s while Zipkin hangs), which
the same line reports.

At shutdown the queued spans are sent, for SPAN_FLUSH_TIMEOUT_SECONDS at most: the SDK's own
shutdown exports batch after batch, each for up to the exporter's timeout, with no overall bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

from app.settings import Settings

logger = logging.getLogger("leaker.tracing")

# Sized for the workshop stack's rate: its client makes about 700 requests a second in leaky mode
# and 1,000 in fixed, three spans each (the SERVER span and two `http send`), so 2,000 to 3,000
# spans a second. The batch processor exports when 512 are queued, but the SDK can miss that
# wake-up (it clears its event after the export loop, while new spans may have set it), and then
# sleeps its schedule delay: 5 s by default, 10,000 spans here, which overflowed the 2,048 queue
# (spans dropped in both modes). A 0.5 s delay bounds a missed wake-up to 1,500 spans, inside the
# queue. When Zipkin is down the queue fills: 4,096 spans, about 12 MB, and then spans are dropped.
MAX_QUEUED_SPANS = 4096
EXPORT_SCHEDULE_DELAY_MILLIS = 500
FAILURE_LOG_INTERVAL_SECONDS = 60.0
EXPORT_TIMEOUT_SECONDS = 2  # for one batch; Zipkin answers a local POST in milliseconds
# Docker kills 10 s after its SIGTERM; `leaker serve` waits 1 s for open requests before this.
SPAN_FLUSH_TIMEOUT_SECONDS = 2.0
MAX_REASON_LENGTH = 300  # a 500 from a proxy can carry a whole HTML page
# The logger of BatchSpanProcessor's queue: the SDK's internal module that holds it.
BATCH_PROCESSOR_LOGGER = "opentelemetry.sdk._shared_internal"


class _HeldBack(logging.Filter):
    """Holds back the error lines a logger emits in a thread while that thread exports."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        held: list[str] | None = getattr(self.local, "held", None)
        if held is None or record.levelno < logging.ERROR:
            return True
        held.append(record.getMessage())
        return False


class _QueueFull(logging.Filter):
    """Holds back the batch processor's "Queue full" warnings, remembering that one came."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False  # set from the threads that end spans, cleared by the exporting one

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not str(record.msg).startswith("Queue full"):
            return True
        self.seen = True
        return False


class QuietExporter(SpanExporter):
    """Wraps an exporter so that a failing backend costs one log line a minute, with the reason.

    The wrapped exporter's own error lines (the Zipkin exporter logs one per failed batch, such as
    "Traces cannot be uploaded; status code: 500, message ...") become that reason. The batch
    processor's warnings that its queue is full, dropping spans, are told in the same line; or,
    when the exports succeed but too slowly, in a line of their own, as rarely.
    """

    def __init__(self, exporter: SpanExporter, name: str) -> None:
        self.exporter = exporter
        self.name = name
        self.failed_batches = 0
        self.last_logged = float("-inf")
        self.exporter_logger = logging.getLogger(type(exporter).__module__)
        self.held_back = _HeldBack()
        self.exporter_logger.addFilter(self.held_back)
        self.processor_logger = logging.getLogger(BATCH_PROCESSOR_LOGGER)
        self.queue_full = _QueueFull()
        self.processor_logger.addFilter(self.queue_full)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        held: list[str] = []
        self.held_back.local.held = held
        try:
            result = self.exporter.export(spans)
        except Exception as error:  # requests raises on refused connections and timeouts
            result = SpanExportResult.FAILURE
            reason = f"{type(error).__name__}: {error}"
        else:
            reason = held[-1] if held else "the backend rejected the batch"
        finally:
            self.held_back.local.held = None
        failed = result is SpanExportResult.FAILURE
        if failed:
            self.failed_batches += 1
        now = time.monotonic()
        if (failed or self.queue_full.seen) and (
            now - self.last_logged >= FAILURE_LOG_INTERVAL_SECONDS
        ):
            self.last_logged = now
            dropping = "; span queue full, new spans dropped" if self.queue_full.seen else ""
            self.queue_full.seen = False
            if failed:
                logger.warning(
                    "%s export failing (%d batches dropped so far): %s%s",
                    self.name,
                    self.failed_batches,
                    _shortened(reason),
                    dropping,
                )
            else:
                logger.warning("%s export slower than the spans come%s", self.name, dropping)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()
        self.exporter_logger.removeFilter(self.held_back)
        self.processor_logger.removeFilter(self.queue_full)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def _shortened(text: str) -> str:
    text = " ".join(text.split())  # one line, whatever the backend answered
    if len(text) <= MAX_REASON_LENGTH:
        return text
    return text[:MAX_REASON_LENGTH] + f"... ({len(text)} characters)"


def shutdown_tracing(
    provider: TracerProvider, timeout_seconds: float = SPAN_FLUSH_TIMEOUT_SECONDS
) -> bool:
    """Send the spans still queued, for `timeout_seconds` at most; False if some were not sent.

    The SDK's shutdown runs in a daemon thread of its own, so that when it outlasts the bound (a
    Zipkin that accepts but never answers costs EXPORT_TIMEOUT_SECONDS a batch) the process can
    still exit without it. It blocks the event loop meanwhile: it is the last thing done.
    """
    flush = threading.Thread(target=provider.shutdown, name="span-flush", daemon=True)
    flush.start()
    flush.join(timeout_seconds)
    if flush.is_alive():
        logger.warning(
            "spans not all sent within %g s of shutdown; the rest are dropped", timeout_seconds
        )
        return False
    return True


def configure_tracing(settings: Settings) -> TracerProvider:
    """Install the global tracer provider that the OpenTelemetry ASGI wrapper reports to."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name}))
    exporter: SpanExporter | None = None
    if settings.traces_exporter == "zipkin":
        from opentelemetry.exporter.zipkin.json import ZipkinExporter

        exporter = QuietExporter(
            ZipkinExporter(endpoint=settings.zipkin_endpoint, timeout=EXPORT_TIMEOUT_SECONDS),
            "Zipkin",
        )
    elif settings.traces_exporter == "console":
        exporter = ConsoleSpanExporter()
    if exporter is not None:
        processor = BatchSpanProcessor(
            exporter,
            max_queue_size=MAX_QUEUED_SPANS,
            schedule_delay_millis=EXPORT_SCHEDULE_DELAY_MILLIS,
        )
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider
