"""The tutorial's labels step: the leaky service's second leak, in a dependency every route
shares, told apart by route where its stack cannot be. Two loads, one on `/` and one on
`/orders/{n}` (a new order each request), then `go tool pprof` with `-tags` and `-tagfocus`."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

from scripts.docs_text import Normalise
from scripts.processes import LEAKER, ROOT, serving

SHOWN_URL = "http://localhost:8080"
ROUTES = "routes.heap.pb.gz"
# One sample per 64 KiB: the second leak, a few hundred bytes a request, then has a hundred
# samples or so after the loads below, enough for its split by route to be read.
RATE = 64 * 1024
SECOND_LEAK = "-focus=remember_visit"


def two_routes(work: Path, generated: Path, requests: int) -> dict[str, object]:
    """Both routes loaded alike; the heap profile and pprof's views of the second leak."""
    settings = {"PPROF_MEM_PROFILE_RATE": str(RATE)}
    with serving("leaky", work, profiler="sampling", settings=settings) as url:
        paths = ["/", "/orders/{n}"]
        loads = [
            subprocess.Popen(
                [*LEAKER, "load", "--url", url + path, "--requests", str(requests)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for path in paths
        ]
        if any(load.wait() != 0 for load in loads):
            raise SystemExit("make_docs: leaker load failed")
        with urllib.request.urlopen(url + "/debug/pprof/heap", timeout=120) as answer:
            (work / ROUTES).write_bytes(answer.read())
    go = shutil.which("go")
    assert go is not None
    normalise = Normalise({work: "."})
    views = {
        "routes-focus.txt": ["-top", "-nodecount=6", SECOND_LEAK, ROUTES],
        "routes-tags.txt": ["-tags", "-tagshow=http.route", SECOND_LEAK, ROUTES],
        "routes-tagfocus-root.txt": ["-top", "-tagfocus=http.route=^/$", SECOND_LEAK, ROUTES],
        "routes-tagfocus.txt": ["-top", "-nodecount=8", "-tagfocus=http.route=/orders/", ROUTES],
    }
    for name, flags in views.items():
        done = subprocess.run(
            [go, "tool", "pprof", *flags], cwd=work, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"make_docs: go tool pprof {' '.join(flags)}:\n{done.stderr}")
        shown = " ".join(f"'{flag}'" if "$" in flag or "{" in flag else flag for flag in flags)
        (generated / name).write_text(normalise(f"$ go tool pprof {shown}\n{done.stdout}"))
    return {
        "routes_requests": f"{requests:,}",
        "routes_rate": RATE,
        "routes_load_orders": f"leaker load --url '{SHOWN_URL}/orders/{{n}}' --requests {requests}",
        "routes_load_root": f"leaker load --url {SHOWN_URL}/ --requests {requests}",
    }
