"""Traces reach Zipkin in the shape its v2 API specifies, and a Zipkin that is down costs nothing.

The real service exports to tests/zipkin_receiver.py, which validates every span it receives
against the Span definition of Zipkin's API and rejects (400) anything else.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from app.load import run_load
from tests.service import Service, free_port, running_service
from tests.zipkin_receiver import ERROR_BODY, ZipkinReceiver, zipkin_receiver

SERVICE_NAME = "leaker-zipkin-contract"
USER_AGENT = "zipkin-contract-test"  # marks our requests, apart from running_service's own
REQUESTS = 20
# BatchSpanProcessor exports every 5 s by default; a busy machine may need longer.
SPANS_DEADLINE_SECONDS = 30.0
CLOCK_SLACK_MICROSECONDS = 1000  # the exporter rounds nanoseconds to microseconds

Span = dict[str, Any]


def zipkin_env(endpoint: str, mode: str) -> dict[str, str]:
    return {
        "LEAK_MODE": mode,
        "OTEL_TRACES_EXPORTER": "zipkin",
        "OTEL_EXPORTER_ZIPKIN_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": SERVICE_NAME,
    }


def send_requests(service: Service, count: int) -> None:
    """`count` GETs of /, each with its own User-Agent, so each span names its request."""
    for number in range(count):
        request = urllib.request.Request(
            service.url + "/", headers={"User-Agent": f"{USER_AGENT}/{number}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200


def our_server_spans(spans: list[Span]) -> list[Span]:
    return [
        span
        for span in spans
        if span.get("kind") == "SERVER"
        and span.get("tags", {}).get("http.user_agent", "").startswith(USER_AGENT + "/")
    ]


def wait_for_server_spans(receiver: ZipkinReceiver, count: int) -> list[Span]:
    deadline = time.monotonic() + SPANS_DEADLINE_SECONDS
    while len(our_server_spans(receiver.received())) < count:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return receiver.received()


@pytest.mark.parametrize("mode", ["leaky", "fixed"])
def test_each_request_sends_one_valid_server_span_to_zipkin(mode: str, tmp_path: Path) -> None:
    with zipkin_receiver() as receiver:
        with running_service(zipkin_env(receiver.endpoint, mode), tmp_path) as service:
            started_us = time.time_ns() // 1000
            send_requests(service, REQUESTS)
            finished_us = time.time_ns() // 1000
            spans = wait_for_server_spans(receiver, REQUESTS)
        rejections = receiver.rejected()

    # Every span the service sent (ours, running_service's, the internal ones) was valid.
    assert rejections == []
    ours = our_server_spans(spans)
    print(f"{mode}: {len(spans)} spans received, {len(ours)} SERVER spans for our {REQUESTS} GETs")
    user_agents = Counter(span["tags"]["http.user_agent"] for span in ours)
    assert user_agents == Counter(f"{USER_AGENT}/{number}" for number in range(REQUESTS))

    server_spans_per_trace = Counter(
        span["traceId"] for span in spans if span.get("kind") == "SERVER"
    )
    for span in ours:
        # FastAPI's own telemetry is off: the ASGI wrapper's span is the only SERVER span.
        assert server_spans_per_trace[span["traceId"]] == 1
        assert "parentId" not in span  # the requests carried no trace context: a new trace each
        assert span["localEndpoint"]["serviceName"] == SERVICE_NAME
        assert span["tags"]["http.method"] == "GET"
        assert span["tags"]["http.target"] == "/"
        assert span["tags"]["http.status_code"] == "200"
        # Microseconds, not milliseconds or nanoseconds: inside the test's own window.
        assert started_us - CLOCK_SLACK_MICROSECONDS <= span["timestamp"]
        assert span["timestamp"] + span["duration"] <= finished_us + CLOCK_SLACK_MICROSECONDS
    assert len({span["traceId"] for span in ours}) == REQUESTS
    assert len({span["id"] for span in spans}) == len(spans)


def test_stopping_the_service_sends_the_spans_still_queued(tmp_path: Path) -> None:
    env = zipkin_env("", "fixed")
    with zipkin_receiver() as receiver:
        env["OTEL_EXPORTER_ZIPKIN_ENDPOINT"] = receiver.endpoint
        # No periodic export during the test: only the shutdown can deliver these spans.
        env["OTEL_BSP_SCHEDULE_DELAY"] = "600000"
        with running_service(env, tmp_path) as service:
            send_requests(service, REQUESTS)
        # running_service stopped it with SIGTERM, as `docker stop` does.
        assert len(our_server_spans(receiver.received())) == REQUESTS


# -- Zipkin unreachable ---------------------------------------------------------------------------

WARMUP_REQUESTS = 3000
UNREACHABLE_REQUESTS = 30_000
# Leaky mode keeps ~1,100 bytes of RSS per request. Fixed mode with Zipkin down holds at most the
# span queue (2,048 spans, whatever the request count): depending on how full it is when RSS is
# read, up to ~5.3 MB was seen (564 B/request over 10,000 requests, once). Over 30,000 requests
# that bounded amount stays under 300 bytes/request (9 MB), still far below the leak.
MAX_GROWTH_BYTES_PER_REQUEST = 300
MAX_LOG_LINES_ABOUT_EXPORT = 5


def resident_memory_bytes(service: Service) -> float:
    with urllib.request.urlopen(service.url + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    match = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.MULTILINE)
    assert match, "no process_resident_memory_bytes in /metrics"
    return float(match.group(1))


def test_fixed_mode_serves_without_growing_while_zipkin_is_unreachable(tmp_path: Path) -> None:
    closed_endpoint = f"http://127.0.0.1:{free_port()}/api/v2/spans"  # nothing listens there
    with running_service(zipkin_env(closed_endpoint, "fixed"), tmp_path) as service:
        warmup = asyncio.run(run_load(service.url + "/", concurrency=50, requests=WARMUP_REQUESTS))
        before = resident_memory_bytes(service)
        load = asyncio.run(
            run_load(service.url + "/", concurrency=50, requests=UNREACHABLE_REQUESTS)
        )
        after = resident_memory_bytes(service)
        log_lines = service.log().splitlines()

    growth_per_request = (after - before) / UNREACHABLE_REQUESTS
    export_lines = [line for line in log_lines if not line.startswith("INFO:")]
    print(
        f"RSS {before / 2**20:.1f} MiB after warm-up, {after / 2**20:.1f} MiB after "
        f"{UNREACHABLE_REQUESTS} requests ({growth_per_request:.0f} bytes/request, "
        f"{load.requests_per_second():.0f} req/s); other log lines:\n" + "\n".join(export_lines)
    )
    assert warmup.errors == 0
    assert load.errors == 0
    assert load.requests == UNREACHABLE_REQUESTS
    assert growth_per_request < MAX_GROWTH_BYTES_PER_REQUEST
    # The exports did fail, and said so, once: not once per request or per batch.
    assert any("Zipkin export failing" in line for line in export_lines)
    assert len(export_lines) <= MAX_LOG_LINES_ABOUT_EXPORT
    assert not any("Traceback" in line for line in log_lines)


ERRORING_REQUESTS = 3000  # three spans each: some 17 batches of 512, each answered 500
FAILED_BATCHES_DEADLINE_SECONDS = 30.0


def test_a_zipkin_answering_500_costs_one_log_line_a_minute_with_the_reason(
    tmp_path: Path,
) -> None:
    with zipkin_receiver(behaviour="error") as receiver:
        with running_service(zipkin_env(receiver.endpoint, "fixed"), tmp_path) as service:
            load = asyncio.run(
                run_load(service.url + "/", concurrency=20, requests=ERRORING_REQUESTS)
            )
            deadline = time.monotonic() + FAILED_BATCHES_DEADLINE_SECONDS
            while receiver.posted() < 10 and time.monotonic() < deadline:
                time.sleep(0.1)
            posted = receiver.posted()
            log_lines = service.log().splitlines()

    other_lines = [line for line in log_lines if not line.startswith("INFO:")]
    print(f"{posted} batches answered 500; log lines other than INFO:\n" + "\n".join(other_lines))
    assert load.errors == 0
    assert posted >= 10
    # One line (the test lasts less than a minute) from our exporter, with Zipkin's answer in it;
    # none from the Zipkin exporter's own logger ("Traces cannot be uploaded", once per batch).
    assert len(other_lines) == 1
    assert "Zipkin export failing" in other_lines[0]
    assert "status code: 500" in other_lines[0] and ERROR_BODY in other_lines[0]


HANGING_LOAD_SECONDS = 25  # over one of the SDK's 20 s windows for its "Queue full" warning


def test_a_hanging_zipkin_costs_one_log_line_a_minute_queue_warnings_included(
    tmp_path: Path,
) -> None:
    with zipkin_receiver(behaviour="hang") as receiver:
        with running_service(zipkin_env(receiver.endpoint, "fixed"), tmp_path) as service:
            load = asyncio.run(
                run_load(service.url + "/", concurrency=10, duration=HANGING_LOAD_SECONDS)
            )
            log_lines = service.log().splitlines()
        posted = receiver.posted()

    other_lines = [line for line in log_lines if not line.startswith("INFO:")]
    print(
        f"{load.requests} requests, {posted} batches posted and never answered; log lines other "
        "than INFO:\n" + "\n".join(other_lines)
    )
    assert load.errors == 0
    # Spans came faster than a hanging Zipkin takes them (512 per 2 s timeout): the queue filled.
    assert load.requests * 3 > posted * 512 + 2048
    assert len(other_lines) == 1
    assert "Zipkin export failing" in other_lines[0] and "timed out" in other_lines[0]


def test_a_zipkin_slower_than_the_spans_is_reported_once_a_minute(tmp_path: Path) -> None:
    with zipkin_receiver(behaviour="slow") as receiver:
        with running_service(zipkin_env(receiver.endpoint, "fixed"), tmp_path) as service:
            load = asyncio.run(
                run_load(service.url + "/", concurrency=10, duration=HANGING_LOAD_SECONDS)
            )
            log_lines = service.log().splitlines()
        accepted = len(receiver.received())

    other_lines = [line for line in log_lines if not line.startswith("INFO:")]
    print(f"{load.requests} requests, {accepted} spans accepted; other log lines:")
    print("\n".join(other_lines))
    assert load.errors == 0
    assert accepted > 0 and load.requests * 3 > accepted + 2048  # some were dropped
    assert other_lines == [
        "Zipkin export slower than the spans come; span queue full, new spans dropped"
    ]


# -- The receiver itself: its checks can fail ------------------------------------------------------

VALID_SPAN: Span = {
    "traceId": "5af7183fb1d4cf5f5af7183fb1d4cf5f",
    "id": "352bff9a74ca9ad2",
    "parentId": "6b221d5bc9e6496c",
    "name": "get /api",
    "timestamp": 1556604172355737,
    "duration": 1431,
    "kind": "SERVER",
    "localEndpoint": {"serviceName": "backend", "ipv4": "192.168.99.1", "port": 3306},
    "tags": {"http.method": "GET"},
}


def post(receiver: ZipkinReceiver, body: bytes, content_type: str = "application/json") -> int:
    request = urllib.request.Request(
        receiver.endpoint, data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_receiver_accepts_a_list_of_valid_spans() -> None:
    internal_span = {**VALID_SPAN, "id": "352bff9a74ca9ad3", "kind": None}  # null: absent
    with zipkin_receiver() as receiver:
        assert post(receiver, json.dumps([VALID_SPAN, internal_span]).encode()) == 202
        internal_span.pop("kind")
        assert receiver.received() == [VALID_SPAN, internal_span]
        assert receiver.rejected() == []


@pytest.mark.parametrize(
    "change",
    [
        {"traceId": "5AF7183FB1D4CF5F"},  # uppercase
        {"traceId": "5af7183fb1d4cf5f5af7"},  # neither 16 nor 32 characters
        {"traceId": None},
        {"id": "352bff9a74ca9ad"},
        {"parentId": "zz2bff9a74ca9ad2"},
        {"timestamp": 1556604172355.737},  # milliseconds with a fraction
        {"timestamp": "1556604172355737"},
        {"duration": 0},
        {"kind": "INTERNAL"},
        {"tags": {"http.status_code": 200}},
        {"localEndpoint": {"serviceName": 7}},
    ],
)
def test_the_receiver_rejects_an_invalid_span(change: Span) -> None:
    with zipkin_receiver() as receiver:
        assert post(receiver, json.dumps([{**VALID_SPAN, **change}]).encode()) == 400
        assert receiver.received() == []
        assert len(receiver.rejected()) == 1


@pytest.mark.parametrize(
    "body",
    [b"not json", json.dumps(VALID_SPAN).encode(), json.dumps([{"name": "no ids"}]).encode()],
)
def test_the_receiver_rejects_a_body_that_is_not_a_list_of_spans(body: bytes) -> None:
    with zipkin_receiver() as receiver:
        assert post(receiver, body) == 400
        assert len(receiver.rejected()) == 1


@pytest.mark.parametrize("behaviour", ["error", "hang"])
def test_a_misbehaving_receiver_counts_the_posts_it_does_not_accept(behaviour: str) -> None:
    body = json.dumps([VALID_SPAN]).encode()
    with zipkin_receiver(behaviour) as receiver:
        request = urllib.request.Request(
            receiver.endpoint, data=body, headers={"Content-Type": "application/json"}
        )
        if behaviour == "error":
            assert post(receiver, body) == 500
        else:
            with pytest.raises(TimeoutError):
                urllib.request.urlopen(request, timeout=0.5)
        assert receiver.posted() == 1
        assert receiver.received() == []


def test_the_receiver_refuses_other_encodings() -> None:
    with zipkin_receiver() as receiver:
        assert post(receiver, b"\x0a\x00", "application/x-protobuf") == 415
