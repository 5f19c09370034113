"""A stand-in for Zipkin's span intake, `POST /api/v2/spans`, strict about what it accepts.

It follows Zipkin's v2 API: the body is a JSON list of spans; a good list is answered 202
Accepted; anything malformed is answered 400 and recorded as a rejection, so a test can assert
that the service never sent one. The span rules below are the Span, Endpoint and Annotation
definitions of Zipkin's API, written out as a JSON Schema. As in Zipkin's own JSON reader, an
optional field set to null counts as absent (OpenTelemetry's exporter sends `"kind": null` for
internal spans); a null ID or tag value is still an error.

A receiver can also misbehave as a real Zipkin sometimes does: `behaviour="error"` answers every
POST 500, `behaviour="hang"` reads it and never answers (until the receiver is closed), and
`behaviour="slow"` accepts each after SLOW_ANSWER_SECONDS.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jsonschema

SPANS_PATH = "/api/v2/spans"
BEHAVIOURS = ("accept", "error", "hang", "slow")
SLOW_ANSWER_SECONDS = 0.8  # with the checks of 512 spans, well under the export timeout of 2 s
ERROR_BODY = "storage is full"  # what the 500 says, so a test can look for it in the log
HEX_64_BITS = "^[0-9a-f]{16}$"

ENDPOINT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "serviceName": {"type": "string"},
        "ipv4": {"type": "string", "format": "ipv4"},
        "ipv6": {"type": "string", "format": "ipv6"},
        "port": {"type": "integer"},
    },
}

# Draft 4, because there 1.0 is not an integer: Zipkin's timestamps and durations are int64s.
SPAN_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-04/schema#",
    "type": "object",
    "required": ["traceId", "id"],
    "properties": {
        # 64 or 128 bits, lowercase hex.
        "traceId": {"type": "string", "pattern": "^([0-9a-f]{16}|[0-9a-f]{32})$"},
        "id": {"type": "string", "pattern": HEX_64_BITS},
        "parentId": {"type": "string", "pattern": HEX_64_BITS},
        "name": {"type": "string"},
        "kind": {"enum": ["CLIENT", "SERVER", "PRODUCER", "CONSUMER"]},
        "timestamp": {"type": "integer", "minimum": 0},  # epoch microseconds
        "duration": {"type": "integer", "minimum": 1},  # microseconds, rounded up
        "debug": {"type": "boolean"},
        "shared": {"type": "boolean"},
        "localEndpoint": ENDPOINT_SCHEMA,
        "remoteEndpoint": ENDPOINT_SCHEMA,
        "annotations": {
            "type": "array",
            "uniqueItems": True,
            "items": {
                "type": "object",
                "required": ["timestamp", "value"],
                "properties": {
                    "timestamp": {"type": "integer"},
                    "value": {"type": "string"},
                },
            },
        },
        "tags": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

LIST_OF_SPANS_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-04/schema#",
    "type": "array",
    "items": SPAN_SCHEMA,
}

LIST_OF_SPANS = jsonschema.Draft4Validator(
    LIST_OF_SPANS_SCHEMA, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER
)


REQUIRED_SPAN_FIELDS = ("traceId", "id")
ENDPOINT_FIELDS = ("localEndpoint", "remoteEndpoint")


def without_nulls(span: Any) -> Any:
    """The span with its optional null fields left out, as Zipkin reads them."""
    if not isinstance(span, dict):
        return span
    kept = {k: v for k, v in span.items() if v is not None or k in REQUIRED_SPAN_FIELDS}
    for name in ENDPOINT_FIELDS:
        if isinstance(kept.get(name), dict):
            kept[name] = {k: v for k, v in kept[name].items() if v is not None}
    return kept


def span_list_errors(body: Any) -> list[str]:
    """Why `body` (decoded JSON, nulls left out) is not a valid list of spans; empty if it is."""
    return [
        f"{'/'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in LIST_OF_SPANS.iter_errors(body)
    ]


@dataclass
class ZipkinReceiver:
    endpoint: str
    behaviour: str = "accept"
    spans: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)  # why each rejected POST was rejected
    posts: int = 0  # POSTs to the spans path, whatever was answered
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)  # ends hanging answers

    def posted(self) -> int:
        with self.lock:
            return self.posts

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)

    def rejected(self) -> list[str]:
        with self.lock:
            return list(self.rejections)


def _handler(receiver: ZipkinReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != SPANS_PATH:
                self._answer(404, "not found")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with receiver.lock:
                receiver.posts += 1
            if receiver.behaviour == "hang":
                receiver.closing.wait()
                self.close_connection = True
                return  # no answer at all
            if receiver.behaviour == "slow":
                receiver.closing.wait(SLOW_ANSWER_SECONDS)
            if receiver.behaviour == "error":
                self._answer(500, ERROR_BODY)
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
            with receiver.lock:
                receiver.spans.extend(spans)
            self._answer(202, "")

        def do_GET(self) -> None:
            self._answer(405 if self.path == SPANS_PATH else 404, "")

        def _reject(self, status: int, reason: str) -> None:
            with receiver.lock:
                receiver.rejections.append(reason)
            self._answer(status, reason)

        def _answer(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per export would drown the test output

    return Handler


@contextmanager
def zipkin_receiver(behaviour: str = "accept") -> Iterator[ZipkinReceiver]:
    """Serve `POST /api/v2/spans` on a free loopback port until the block ends."""
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {BEHAVIOURS}, not {behaviour!r}")
    receiver = ZipkinReceiver(endpoint="", behaviour=behaviour)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    receiver.endpoint = f"http://127.0.0.1:{server.server_address[1]}{SPANS_PATH}"
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="zipkin-receiver",
        daemon=True,
    )
    thread.start()
    try:
        yield receiver
    finally:
        receiver.closing.set()
        server.shutdown()
        server.server_close()
        thread.join()
