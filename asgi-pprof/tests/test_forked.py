"""Profiles are built in a forked child; without fork, in-process; a child that fails, hangs or
runs out of memory is an error with its reason, never a rebuild in the service."""

from __future__ import annotations

import os
import signal
import threading
import time
import tracemalloc

import pytest

from asgi_pprof import forked


def where_it_ran(in_child: bool) -> bytes:
    return f"{os.getpid()} {in_child} {tracemalloc.is_tracing()}".encode()


def test_the_work_runs_in_a_child_that_stops_only_its_own_tracing() -> None:
    tracemalloc.start(1)
    try:
        pid, in_child, _ = forked.run(lambda in_child: where_it_ran(in_child)).split()
        assert int(pid) != os.getpid() and in_child == b"True"
        assert tracemalloc.is_tracing()  # the parent's tracing is untouched
    finally:
        tracemalloc.stop()


def test_a_large_answer_comes_back_whole() -> None:
    answer = forked.run(lambda in_child: bytes(range(256)) * 40_000)
    assert answer == bytes(range(256)) * 40_000


def test_without_fork_the_work_runs_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "fork")
    pid, in_child, _ = forked.run(where_it_ran).split()
    assert int(pid) == os.getpid() and in_child == b"False"


def test_a_failing_child_is_an_error_not_a_rebuild_here() -> None:
    parent = os.getpid()
    ran_here = []

    def fails_in_child(in_child: bool) -> bytes:
        if os.getpid() != parent:
            raise RuntimeError("broken child")
        ran_here.append(True)
        return b"here"

    with pytest.raises(forked.ChildFailed, match="status 1"):
        forked.run(fails_in_child)
    assert ran_here == []


def test_a_child_that_hangs_is_killed_and_its_reason_given() -> None:
    parent = os.getpid()

    def hangs_in_child(in_child: bool) -> bytes:
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGSTOP)  # the child never answers
        return b"here"

    started = time.monotonic()
    with pytest.raises(forked.ChildFailed, match="took more than 1 s") as raised:
        forked.run(hangs_in_child, timeout=1)
    assert time.monotonic() - started < 5
    assert "sampling heap profiler" in str(raised.value)


def test_the_child_timeout_is_under_go_tool_pprofs_own() -> None:
    assert forked.CHILD_TIMEOUT_SECONDS < 60  # pprof gives up on a fetch after 60 s


def test_a_cancelled_build_kills_its_child_at_once() -> None:
    parent = os.getpid()
    cancelled = threading.Event()

    def slow_in_child(in_child: bool) -> bytes:
        if os.getpid() != parent:
            time.sleep(60)
        return b"here"

    threading.Timer(0.3, cancelled.set).start()
    started = time.monotonic()
    with pytest.raises(forked.ChildFailed, match="cancelled"):
        forked.run(slow_in_child, cancelled=cancelled)
    assert time.monotonic() - started < 3


def test_the_child_volunteers_for_the_out_of_memory_killer() -> None:
    def score(in_child: bool) -> bytes:
        with open("/proc/self/oom_score_adj", "rb") as adjustment:
            return adjustment.read().strip()

    if not os.path.exists("/proc/self/oom_score_adj"):
        pytest.skip("no /proc/self/oom_score_adj (not Linux)")
    assert forked.run(score) == b"1000"
    assert score(False) != b"1000"  # the service itself keeps its score


def test_a_child_killed_for_memory_is_an_error_not_a_retry_here() -> None:
    parent = os.getpid()
    ran_here = []

    def killed_in_child(in_child: bool) -> bytes:
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer does
        ran_here.append(True)
        return b"here"

    tracemalloc.start(1)
    try:
        with pytest.raises(forked.ChildOutOfMemory) as raised:
            forked.run(killed_in_child)
    finally:
        tracemalloc.stop()
    assert ran_here == []  # no in-process retry: it would need the memory that killed the child
    message = str(raised.value)
    assert "for lack of memory" in message and "MiB of tracemalloc tables" in message
    assert "needs about" in message and "Instead:" in message
