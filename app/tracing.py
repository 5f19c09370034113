"""Tracing to Zipkin: an SDK tracer provider, a bounded batch queue, the Zipkin JSON exporter.

While Zipkin is down the batch processor drops spans from its bounded queue; the exporter below
turns each failed export into a result instead of a traceback, and logs once a minute at most.
"""

from __future__ import annotations

import logging
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

# Spans waiting for export; when Zipkin is down, new spans beyond this are dropped, not kept.
MAX_QUEUED_SPANS = 2048
FAILURE_LOG_INTERVAL_SECONDS = 60.0


class QuietExporter(SpanExporter):
    """Wraps an exporter so that an unreachable backend costs one log line a minute."""

    def __init__(self, exporter: SpanExporter, name: str) -> None:
        self.exporter = exporter
        self.name = name
        self.failed_batches = 0
        self.last_logged = float("-inf")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.exporter.export(spans)
        except Exception as error:  # requests raises on refused connections and timeouts
            result = SpanExportResult.FAILURE
            reason = f"{type(error).__name__}: {error}"
        else:
            reason = "the backend rejected the batch"
        if result is SpanExportResult.FAILURE:
            self.failed_batches += 1
            now = time.monotonic()
            if now - self.last_logged >= FAILURE_LOG_INTERVAL_SECONDS:
                self.last_logged = now
                logger.warning(
                    "%s export failing (%d batches dropped so far): %s",
                    self.name,
                    self.failed_batches,
                    reason,
                )
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def configure_tracing(settings: Settings) -> TracerProvider:
    """Install the global tracer provider that the OpenTelemetry ASGI wrapper reports to."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name}))
    exporter: SpanExporter | None = None
    if settings.traces_exporter == "zipkin":
        from opentelemetry.exporter.zipkin.json import ZipkinExporter

        exporter = QuietExporter(
            ZipkinExporter(endpoint=settings.zipkin_endpoint, timeout=2), "Zipkin"
        )
    elif settings.traces_exporter == "console":
        exporter = ConsoleSpanExporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=MAX_QUEUED_SPANS))
    trace.set_tracer_provider(provider)
    return provider
