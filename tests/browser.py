"""A page as a reader's browser shows it: Debian's chromium, headless, after the page's scripts ran.

`rendered_dom` is the document once its scripts have drawn it; screenshots are taken with
scripts/screenshots.py's `screenshot` (the same browser flags, and a check that the image is not
blank).
"""

from __future__ import annotations

import subprocess
import tempfile

from scripts.screenshots import BROWSER_TIMEOUT_SECONDS, RENDER_BUDGET_MS


def rendered_dom(chromium: str, url: str) -> str:
    """The page's DOM, serialised, after RENDER_BUDGET_MS of virtual time for its scripts."""
    with tempfile.TemporaryDirectory(prefix="leaker-chromium-") as profile_dir:
        done = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",  # its sandbox needs user namespaces, which CI may not allow
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile_dir}",
                f"--virtual-time-budget={RENDER_BUDGET_MS}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=BROWSER_TIMEOUT_SECONDS,
        )
    assert done.returncode == 0 and done.stdout, f"chromium could not open {url}:\n{done.stderr}"
    return done.stdout
