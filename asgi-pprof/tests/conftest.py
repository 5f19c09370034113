"""Shared test helpers.

`require_tool` skips a test whose command-line tool is not installed, with the reason, except
under `CI=true`: .ci/run installs every tool, so there a missing one is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest


def find_tool(name: str) -> str:
    """The path of the command `name`; skips the test if it is missing, fails it under CI=true."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name!r} is not installed (.ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so a missing tool is a failure", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    """`require_tool("promtool")` in a test returns the tool's path (see `find_tool`)."""
    return find_tool
