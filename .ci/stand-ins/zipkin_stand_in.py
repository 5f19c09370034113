"""A stand-in for the Zipkin server, for machines that cannot pull openzipkin/zipkin.

It takes spans as Zipkin does, on `POST /api/v2/spans`: a body that is not a JSON list is answered
400 at once; a list is answered 202 Accepted and then, as Zipkin stores what it accepted, checked
in a thread of its own against Zipkin's v2 API with the project's test receiver
(tests/zipkin_receiver.py, copied beside this file). A valid list is stored; an invalid one is
counted as rejected, with the reason on stderr (so `docker compose logs zipkin` shows it).

Why after answering: the check costs about 0.2 ms a span here. Done before answering, it made
the stand-in the slowest step of the service's exports, and the service's span queue overflowed
at the stack's 2,000 spans a second. Checked after, the exporter sends its next batch meanwhile.
A backlog of CHECK_BACKLOG unchecked lists makes the next POST wait, so a check that cannot keep
up still holds the exporter back instead of filling this process's memory.

It serves the part of Zipkin's read API that the workshop's checks use: `GET /api/v2/services`,
`GET /api/v2/spans?serviceName=`, `GET /api/v2/traces` (`serviceName`, `limit`),
`GET /api/v2/trace/{traceId}` and `GET /health`. Like Zipkin's in-memory store it keeps the newest
MEM_MAX_SPANS spans (default 500,000). Zipkin has no API that counts what it received; the
stand-in adds one for the stack test: `GET /stand-in/received` answers how many spans it stored
since it started (all of them, not only those still kept), how many lists it rejected, and how
many stored spans were SERVER spans, by the `http.user_agent` tag of the request each traces.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
from collections import Counter, OrderedDict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from zipkin_receiver import SPANS_PATH, span_list_errors, without_nulls

PORT = 9411
DEFAULT_LIMIT = 10
RECEIVED_PATH = "/stand-in/received"
CHECK_BACKLOG = 16  # lists accepted and not yet checked: 16 of the exporter's 512 spans, 8 MB


class SpanStore:
    """The newest `capacity` spans, in arrival order, and counts of every span received."""

    def __init__(self, capacity: int) -> None:
        self.spans: deque[dict[str, Any]] = deque(maxlen=capacity)
        self.lock = threading.Lock()
        self.received = 0
        self.rejected_lists = 0
        self.server_spans_by_user_agent: Counter[str] = Counter()
        self.unchecked: queue.Queue[list[Any]] = queue.Queue(maxsize=CHECK_BACKLOG)

    def add(self, spans: list[dict[str, Any]]) -> None:
        agents = [
            str(span.get("tags", {}).get("http.user_agent", ""))
            for span in spans
            if span.get("kind") == "SERVER"
        ]
        with self.lock:
            self.spans.extend(spans)
            self.received += len(spans)
            self.server_spans_by_user_agent.update(agents)

    def check_forever(self) -> None:
        """Checks each accepted list, in order; stores the valid ones (run in a thread)."""
        while True:
            spans = [without_nulls(span) for span in self.unchecked.get()]
            errors = span_list_errors(spans)
            if errors:
                print(f"zipkin stand-in: rejected a list: {'; '.join(errors)}", file=sys.stderr)
                with self.lock:
                    self.rejected_lists += 1
            else:
                self.add(spans)
            self.unchecked.task_done()

    def counts(self) -> dict[str, Any]:
        with self.lock:
            return {
                "spans": self.received,
                "rejected_lists": self.rejected_lists,
                "server_spans_by_user_agent": dict(self.server_spans_by_user_agent),
            }

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
            if not isinstance(spans, list):
                self._reject(400, f"not a list of spans: {type(spans).__name__}")
                return
            store.unchecked.put(spans)  # waits while CHECK_BACKLOG lists are still unchecked
            self._answer(202, "text/plain", b"")

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {name: values[0] for name, values in parse_qs(url.query).items()}
            if url.path == "/health":
                self._json({"status": "UP", "zipkin": {"status": "UP"}})
            elif url.path == RECEIVED_PATH:
                self._json(store.counts())
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
    threading.Thread(target=store.check_forever, name="check", daemon=True).start()
    server = ThreadingHTTPServer(("0.0.0.0", PORT), handler(store))
    server.daemon_threads = True
    # As PID 1 in its container it gets no default action for SIGTERM: `docker stop` would wait.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"zipkin stand-in: listening on :{PORT}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
