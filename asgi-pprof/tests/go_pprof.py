"""Running the real `go tool pprof` in tests."""

from __future__ import annotations

import os
import subprocess
import tempfile

PPROF_TIMEOUT_SECONDS = 120


def run_pprof(go: str, *arguments: str) -> str:
    """`go tool pprof ARGUMENTS`' output; fails the test with pprof's message if it fails."""
    with tempfile.TemporaryDirectory() as fetched:
        result = subprocess.run(
            [go, "tool", "pprof", *arguments],
            capture_output=True,
            text=True,
            timeout=PPROF_TIMEOUT_SECONDS,
            # pprof keeps a copy of every profile it fetches, in $HOME/pprof unless told otherwise.
            env={**os.environ, "PPROF_TMPDIR": fetched},
        )
    assert result.returncode == 0, f"go tool pprof {' '.join(arguments)}:\n{result.stderr}"
    return result.stdout
