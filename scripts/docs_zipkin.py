"""The tutorial's Zipkin step: one SERVER span as the service sends it, caught by the test suite's
Zipkin stand-in (which checks it against Zipkin's span schema) rather than by a Zipkin server."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from scripts.processes import serving
from tests.zipkin_receiver import zipkin_receiver


def one_span(work: Path, generated: Path) -> dict[str, object]:
    """A request to the leaky service, traced to Zipkin: its span in zipkin-span.json."""
    with zipkin_receiver() as zipkin:
        with serving("leaky", work, zipkin=zipkin.endpoint) as url:
            urllib.request.urlopen(url + "/", timeout=10).close()
        # The service has stopped: at shutdown it sends the spans still queued.
        spans = zipkin.received()
        rejected = zipkin.rejected()
    if rejected:
        raise SystemExit(f"make_docs: the Zipkin stand-in rejected spans: {rejected}")
    server = [span for span in spans if span.get("kind") == "SERVER"]
    if not server:
        raise SystemExit(f"make_docs: no SERVER span among the {len(spans)} spans received")
    span: dict[str, Any] = server[-1]  # the request above: the first ones were startup probes
    (generated / "zipkin-span.json").write_text(json.dumps(span, indent=2, sort_keys=True) + "\n")
    return {"zipkin_spans_per_request": len(spans) // len(server)}
