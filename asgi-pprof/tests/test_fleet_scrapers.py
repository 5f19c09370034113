"""The requests that Grafana Alloy's `pyroscope.scrape` and Parca send with the scrape
configurations of the README, sent to a real service (one process, and three workers with
PPROF_MULTIPROC_DIR), and the answers checked as each scraper checks them. Neither scraper can be
installed here, so the requests are theirs, written down from their source:

- Alloy (internal/component/pyroscope/scrape): a GET of `path_prefix + path`, `?seconds=N` added
  for a profile with `delta = true` (N = scrape_interval - 1 s: 14 by default), with
  `User-Agent: Alloy/<version> (<os>)`; Go's client adds `Accept-Encoding: gzip`. It times out
  after scrape_timeout (10 s), plus scrape_interval - 1 s with `seconds`. An answer counts if its
  status is 2xx, its body is not empty, its Content-Type starts with application/octet-stream and
  the body is gzip or protobuf (validate.go); `memory` is then turned into a delta of its
  alloc_objects/count and alloc_space/bytes samples (delta_profiles.go).
- Parca (pkg/scrape): a GET with `?seconds=<scrape_interval>` (10 by default) for `delta`
  profiles, `User-Agent: conprof/<version>`; status 200 exactly and a body that is not empty;
  scrape_timeout defaults to scrape_interval + 3 s.
"""

from __future__ import annotations

import gzip
import http.client
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from multi_worker import multi_worker_service
from pprof_decode import decode
from server import Server, serving


@dataclass(frozen=True)
class Scrape:
    scraper: str
    profile: str  # the scraper's name for it
    path: str  # with the query the scraper adds
    user_agent: str
    timeout_seconds: float
    sample_types: tuple[tuple[str, str], ...]  # that the answer must have


ALLOY_AGENT = "Alloy/v1.10.2 (linux; binary)"
PARCA_AGENT = "conprof/v0.24.2"
MEMORY = (("alloc_objects", "count"), ("alloc_space", "bytes"))  # what Alloy's delta needs
GOROUTINE = (("goroutine", "count"),)
CPU = (("samples", "count"), ("cpu", "nanoseconds"))
SCRAPES = [
    Scrape("alloy", "memory", "/debug/pprof/allocs", ALLOY_AGENT, 10, MEMORY),
    Scrape("alloy", "goroutine", "/debug/pprof/goroutine", ALLOY_AGENT, 10, GOROUTINE),
    Scrape("alloy", "process_cpu", "/debug/pprof/profile?seconds=14", ALLOY_AGENT, 24, CPU),
    Scrape("parca", "memory", "/debug/pprof/allocs", PARCA_AGENT, 13, MEMORY),
    Scrape("parca", "goroutine", "/debug/pprof/goroutine", PARCA_AGENT, 13, GOROUTINE),
    Scrape("parca", "process_cpu", "/debug/pprof/profile?seconds=10", PARCA_AGENT, 13, CPU),
]
# What both enable by default and the configurations disable: Python has no such profile.
DISABLED = [
    "/debug/pprof/block",
    "/debug/pprof/mutex",
    "/debug/fgprof",
    "/debug/pprof/delta_heap",
    "/debug/pprof/delta_block",
    "/debug/pprof/delta_mutex",
]


@dataclass
class Scraped:
    status: int
    headers: dict[str, str]
    body: bytes


def scrape(server: Server, path: str, user_agent: str, timeout: float) -> Scraped:
    """One GET as Go's http.Client sends it for the scrapers."""
    url = urlsplit(server.url)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
    try:
        connection.request(
            "GET", path, headers={"User-Agent": user_agent, "Accept-Encoding": "gzip"}
        )
        answer = connection.getresponse()
        headers = {name.lower(): value for name, value in answer.getheaders()}
        return Scraped(answer.status, headers, answer.read())
    except (OSError, http.client.HTTPException) as error:
        log = server.log()[-6000:]
        raise AssertionError(f"GET {path}: {error!r}; the server's log ends:\n{log}") from error
    finally:
        connection.close()


@pytest.fixture(scope="module", params=["one process", "uvicorn --workers 3"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    tmp_path: Path = tmp_path_factory.mktemp("scraped")
    with ExitStack() as stack:
        if request.param == "one process":
            server = stack.enter_context(serving("workers_service:app", tmp_path))
        else:
            # PPROF_MULTIPROC_TIMEOUT_SECONDS at its default, which the scrapers' budgets allow.
            service = multi_worker_service("uvicorn", tmp_path, timeout_seconds=2)
            server = stack.enter_context(service).server
        yield server


@pytest.mark.parametrize("wanted", SCRAPES, ids=lambda s: f"{s.scraper}-{s.profile}")
def test_each_enabled_profile_answers_as_the_scraper_expects(
    target: Server, wanted: Scrape
) -> None:
    scraped = scrape(target, wanted.path, wanted.user_agent, wanted.timeout_seconds)
    assert scraped.status == 200, scraped.body[:500]
    assert scraped.headers["content-type"].startswith("application/octet-stream")
    assert "content-encoding" not in scraped.headers  # the body is the gzipped profile itself
    assert scraped.body[:2] == b"\x1f\x8b"
    profile = decode(gzip.decompress(scraped.body))  # as the scrapers' stores parse it
    types = {
        (profile.string_table[t.type], profile.string_table[t.unit]) for t in profile.sample_type
    }
    assert set(wanted.sample_types) <= types
    if "seconds=" in wanted.path:
        seconds = int(wanted.path.rsplit("=", 1)[1])
        assert profile.duration_nanos >= seconds * 1_000_000_000
    else:
        assert len(profile.sample) > 0


@pytest.mark.parametrize("path", DISABLED)
def test_what_the_configurations_disable_is_not_found(target: Server, path: str) -> None:
    """Enabled, these would fail every scrape: hence `enabled = false` in the README."""
    assert scrape(target, path, ALLOY_AGENT, 10).status == 404
