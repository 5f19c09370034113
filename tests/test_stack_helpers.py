"""The pieces the workshop stack test and CI stand on, checked without Docker: `make test`'s step
runner, the stack test's scenario records and its reading of the client's logs, and the Zipkin
stand-in's counts."""

from __future__ import annotations

import importlib
import json
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.stack import client_answered
from tests.stack_report import run_scenario

ROOT = Path(__file__).resolve().parent.parent
SERVER_SPAN = {
    "traceId": "463ac35c9f6413ad48485a3953bb6124",
    "id": "a2fb4a1d1a96d312",
    "kind": "SERVER",
    "name": "get /",
    "localEndpoint": {"serviceName": "leaker"},
    "tags": {"http.user_agent": "leaker-load"},
}


def test_make_test_runs_every_step_and_fails_if_one_did(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run_tests.sh")]
        + ["first", "echo '== 1 failed, 2 passed in 0.1s =='; exit 1"]
        + ["second", f"touch {tmp_path}/ran; echo '== 3 passed in 0.2s =='"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert (tmp_path / "ran").exists(), "a step after a failed one did not run"
    recap = done.stdout[done.stdout.index("== make test, step by step") :].splitlines()[1:]
    assert recap == [
        "   FAILED    first (exit status 1): 1 failed, 2 passed in 0.1s",
        "   ok        second: 3 passed in 0.2s",
    ]


def test_the_client_logs_are_read_round_by_round() -> None:
    logs = (
        "client_1  | requests:    41877\n"
        "client_1  | statuses:    200: 41873, 503: 4\n"
        "client_1  |    55.3 s      30080 requests       0 errors     605.8 req/s now\n"
        "client_1  | statuses:    200: 12\n"
        "client_1  | statuses:    -\n"
    )
    assert client_answered(logs) == (41873 + 12, 3)


def test_a_scenario_keeps_what_it_found_before_it_failed() -> None:
    def steps(found: dict[str, Any]) -> None:
        found["first"] = 1
        raise AssertionError("the second step failed")

    scenario = run_scenario("a scenario", steps)
    assert scenario["first"] == 1
    with pytest.raises(pytest.fail.Exception, match="the second step failed"):
        scenario["second"]


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """.ci/stand-ins/zipkin_stand_in.py, which imports the test receiver as its image has it."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    monkeypatch.syspath_prepend(str(ROOT / ".ci" / "stand-ins"))
    return importlib.import_module("zipkin_stand_in")


@pytest.fixture
def zipkin(stand_in: ModuleType) -> Iterator[tuple[str, Any]]:
    store = stand_in.SpanStore(100)
    threading.Thread(target=store.check_forever, daemon=True).start()
    server = ThreadingHTTPServer(("127.0.0.1", 0), stand_in.handler(store))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", store
    finally:
        server.shutdown()
        server.server_close()


def post(url: str, body: Any) -> int:
    request = urllib.request.Request(
        url + "/api/v2/spans",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_zipkin_stand_in_counts_what_it_stored_and_rejected(
    zipkin: tuple[str, Any], stand_in: ModuleType
) -> None:
    url, store = zipkin
    internal = {**SERVER_SPAN, "id": "a2fb4a1d1a96d313", "kind": None, "name": "get / http send"}
    assert post(url, [SERVER_SPAN, internal]) == 202
    assert post(url, [{"id": "not hex"}]) == 202  # answered first, checked after, as Zipkin
    assert post(url, {"not": "a list"}) == 400
    store.unchecked.join()
    with urllib.request.urlopen(url + stand_in.RECEIVED_PATH, timeout=10) as answer:
        counts = json.load(answer)
    assert counts == {
        "spans": 2,
        "rejected_lists": 1,
        "server_spans_by_user_agent": {"leaker-load": 1},
    }
