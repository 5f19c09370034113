"""A stand-in for the Zipkin server, for machines that cannot pull openzipkin/zipkin.

It takes spans as Zipkin does, on `POST /api/v2/spans`, and checks each list against Zipkin's
v2 API with the project's test receiver (tests/zipkin_receiver.py, copied beside this file):
a valid list is answered 202 and stored, anything else 400, with the reason on stderr (so
`docker compose logs zipkin` shows it). It serves the part of Zipkin's read API that the workshop's
checks use: `GET /api/v2/services`, `GET /api/v2/spans?serviceName=`, `GET /api/v2/traces`
(`serviceName`, `limit`), `GET /api/v2/trace/{traceId}` and `GET /health`. Like Zipkin's in-memory
store it keeps the newest MEM_MAX_SPANS spans (default 500,000).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections import OrderedDict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from zipkin_receiver import SPANS_PATH, span_list_errors, without_nulls

PORT = 9411
DEFAULT_LIMIT = 10


class SpanStore:
    """The newest `capacity` spans, in arrival order."""

    def __init__(self, capacity: int) -> None:
        self.spans: deque[dict[str, Any]] = deque(maxlen=capacity)
        self.lock = threading.Lock()

    def add(self, spans: list[dict[str, Any]]) -> None:
        with self.lock:
            self.spans.extend(spans)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)

    def traces(self, service: str | None, limit: int) -> list[list[dict[str, Any]]]:
        """The newest `limit` traces with a span of `service` (any service if None)."""
        by_trace: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        for span in self.snapshot():
            by_trace.setdefault(span["traceId"], []).append(span)
            by_trace.move_to_end(span["traceId"])
        wanted = [
            spans
            for spans in reversed(by_trace.values())
            if service is None or any(_service_of(span) == service for span in spans)
        ]
        return wanted[:limit]


def _service_of(span: dict[str, Any]) -> str | None:
    return span.get("localEndpoint", {}).get("serviceName")


def handler(store: SpanStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's requests session expects

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if urlsplit(self.path).path != SPANS_PATH:
                self._answer(404, "text/plain", b"not found")
                return
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
            if content_type != "application/json":
                self._reject(415, f"unsupported content type {content_type!r}")
                return
            try:
                spans = json.loads(body)
            except ValueError as error:
                self._reject(400, f"malformed JSON: {error}")
                return
            if isinstance(spans, list):
                spans = [without_nulls(span) for span in spans]
            errors = span_list_errors(spans)
            if errors:
                self._reject(400, "; ".join(errors))
                return
            store.add(spans)
            self._answer(202, "text/plain", b"")

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {name: values[0] for name, values in parse_qs(url.query).items()}
            if url.path == "/health":
                self._json({"status": "UP", "zipkin": {"status": "UP"}})
            elif url.path == "/api/v2/services":
                self._json(sorted({s for s in map(_service_of, store.snapshot()) if s}))
            elif url.path == SPANS_PATH and "serviceName" in query:
                spans = store.snapshot()
                names = {s.get("name") for s in spans if _service_of(s) == query["serviceName"]}
                self._json(sorted(name for name in names if name))
            elif url.path == "/api/v2/traces":
                limit = int(query.get("limit", DEFAULT_LIMIT))
                self._json(store.traces(query.get("serviceName"), limit))
            elif url.path.startswith("/api/v2/trace/"):
                trace_id = url.path.rpartition("/")[2]
                spans = [span for span in store.snapshot() if span["traceId"] == trace_id]
                if spans:
                    self._json(spans)
                else:
                    self._answer(404, "text/plain", f"trace {trace_id} not found".encode())
            else:
                self._answer(404, "text/plain", b"not found")

        def _reject(self, status: int, reason: str) -> None:
            print(f"zipkin stand-in: rejected a POST ({status}): {reason}", file=sys.stderr)
            self._answer(status, "text/plain", reason.encode())

        def _json(self, value: Any) -> None:
            self._answer(200, "application/json", json.dumps(value).encode())

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a line per export would drown the stack's logs

    return Handler


def main() -> None:
    store = SpanStore(int(os.environ.get("MEM_MAX_SPANS", "500000")))
    server = ThreadingHTTPServer(("0.0.0.0", PORT), handler(store))
    server.daemon_threads = True
    # As PID 1 in its container it gets no default action for SIGTERM: `docker stop` would wait.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"zipkin stand-in: listening on :{PORT}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
