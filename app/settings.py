"""Settings read from the environment once, at startup, and validated there.

A bad value stops the process with a message that names the variable and what it accepts, so a
typo in a compose file fails loudly instead of running the wrong experiment.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

LEAK_MODES = ("leaky", "fixed")
TRACES_EXPORTERS = ("zipkin", "console", "none")
TRACEMALLOC_STARTS = ("startup", "on-demand")
HEAP_PROFILERS = ("tracemalloc", "sampling")
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
URL_SCHEMES = ("http", "https")
# Fewer digits than a signed 64-bit integer holds, and checked before int(), which refuses more
# than 4,300 digits with a traceback.
MAX_INTEGER_DIGITS = 18
REGISTERED_HOST_NAME = re.compile(r"[\w.-]+")  # letters (any script), digits, _, . and -
MAX_SHOWN_LENGTH = 40  # of a bad value, in the error message


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot run with."""


@dataclass(frozen=True)
class Settings:
    leak_mode: str = "leaky"
    service_name: str = "leaker"
    traces_exporter: str = "zipkin"
    zipkin_endpoint: str = "http://localhost:9411/api/v2/spans"
    pprof_enabled: bool = True
    pprof_labels: bool = True  # with the sampler: route, method and thread on each sample
    tracemalloc_start: str = "on-demand"
    tracemalloc_frames: int = 8  # the leak's deepest stack reaches app/main.py in 6 frames
    heap_profiler: str = "tracemalloc"
    mem_profile_rate: int = 524288  # Go's runtime.MemProfileRate: one sample per 512 KiB
    mem_profile_max_bytes: int = 4 << 20  # the sampler's own memory, tables and all

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        return cls(
            leak_mode=_choice(environ, "LEAK_MODE", LEAK_MODES, cls.leak_mode),
            service_name=environ.get("OTEL_SERVICE_NAME", cls.service_name) or cls.service_name,
            traces_exporter=_choice(
                environ, "OTEL_TRACES_EXPORTER", TRACES_EXPORTERS, cls.traces_exporter
            ),
            zipkin_endpoint=_url(environ, "OTEL_EXPORTER_ZIPKIN_ENDPOINT", cls.zipkin_endpoint),
            pprof_enabled=_boolean(environ, "PPROF_ENABLED", cls.pprof_enabled),
            pprof_labels=_boolean(environ, "PPROF_LABELS", cls.pprof_labels),
            tracemalloc_start=_choice(
                environ, "PPROF_TRACEMALLOC", TRACEMALLOC_STARTS, cls.tracemalloc_start
            ),
            tracemalloc_frames=_integer(
                environ, "PPROF_TRACEMALLOC_FRAMES", cls.tracemalloc_frames, 1, 1000
            ),
            heap_profiler=_choice(
                environ, "PPROF_HEAP_PROFILER", HEAP_PROFILERS, cls.heap_profiler
            ),
            mem_profile_rate=_integer(
                environ, "PPROF_MEM_PROFILE_RATE", cls.mem_profile_rate, 1, 1 << 40
            ),
            mem_profile_max_bytes=_integer(
                environ, "PPROF_MEM_PROFILE_MAX_BYTES", cls.mem_profile_max_bytes, 1 << 18, 1 << 34
            ),
        )

    def describe(self) -> str:
        """One line for the log at startup, so that two services side by side are told apart."""
        return ", ".join(
            [f"LEAK_MODE={self.leak_mode}", self._describe_profiler(), self._describe_traces()]
        )

    def _describe_profiler(self) -> str:
        if not self.pprof_enabled:
            return "no /debug/pprof/ (PPROF_ENABLED=false)"
        if self.heap_profiler == "sampling":
            return f"heap profiler sampling (one sample per {self.mem_profile_rate:,} bytes)"
        return (
            f"heap profiler tracemalloc ({self.tracemalloc_start}, "
            f"{self.tracemalloc_frames} frames)"
        )

    def _describe_traces(self) -> str:
        if self.traces_exporter == "none":
            return "no traces (OTEL_TRACES_EXPORTER=none)"
        if self.traces_exporter == "console":
            return f"traces of {self.service_name!r} to the console"
        endpoint = _without_password(self.zipkin_endpoint)
        return f"traces of {self.service_name!r} to Zipkin at {endpoint}"


# What each variable does, for `leaker serve --help`: every one that Settings.from_environ reads.
ENVIRONMENT_VARIABLES = {
    "LEAK_MODE": f"{' or '.join(LEAK_MODES)}: the OpenTelemetry wrapper built per request, or once "
    f"(default: {Settings.leak_mode})",
    "OTEL_SERVICE_NAME": f"the service's name in its traces (default: {Settings.service_name})",
    "OTEL_TRACES_EXPORTER": f"{', '.join(TRACES_EXPORTERS)} (default: {Settings.traces_exporter})",
    "OTEL_EXPORTER_ZIPKIN_ENDPOINT": f"where spans go (default: {Settings.zipkin_endpoint})",
    "PPROF_ENABLED": "true or false: serve /debug/pprof/ (default: true)",
    "PPROF_LABELS": "true or false: with the sampler, label each sample with its request's route "
    "and method and its thread (default: true)",
    "PPROF_TRACEMALLOC": f"{' or '.join(TRACEMALLOC_STARTS)}: tracemalloc traces from the start, "
    f"or during heap windows only (default: {Settings.tracemalloc_start})",
    "PPROF_TRACEMALLOC_FRAMES": "frames kept per traced allocation, 1 to 1000 "
    f"(default: {Settings.tracemalloc_frames})",
    "PPROF_HEAP_PROFILER": f"{' or '.join(HEAP_PROFILERS)}: every live block, exact and slow, or "
    f"Go's sampling, nearly free (default: {Settings.heap_profiler})",
    "PPROF_MEM_PROFILE_RATE": "sampling: one sample per this many bytes allocated, 1 to 2**40 "
    f"(default: {Settings.mem_profile_rate})",
    "PPROF_MEM_PROFILE_MAX_BYTES": "sampling: the bound on the sampler's own memory, 262144 to "
    f"2**34 bytes (default: {Settings.mem_profile_max_bytes})",
}


def _choice(environ: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = environ.get(name, "").strip().lower() or default
    if value not in allowed:
        allowed_values = ", ".join(allowed)
        raise SettingsError(
            f"{name}={_shown(environ[name])} is not allowed; use one of: {allowed_values}"
        )
    return value


def _boolean(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in BOOLEANS:
        raise SettingsError(f"{name}={_shown(environ[name])} is not allowed; use true or false")
    return BOOLEANS[value]


def _integer(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """A whole number from `low` to `high` (0 or more: no sign), in ASCII digits.

    str.isdigit() alone also passes "²" (which int() refuses) and "٣" (which int() reads as 3).
    """
    value = environ.get(name, "").strip()
    if not value:
        return default
    digits = value.isascii() and value.isdigit() and len(value) <= MAX_INTEGER_DIGITS
    if not digits or not low <= int(value) <= high:
        raise SettingsError(
            f"{name}={_shown(value)} is not allowed; use an integer from {low} to {high}"
        )
    return int(value)


def _url(environ: Mapping[str, str], name: str, default: str) -> str:
    """An http:// or https:// URL (scheme in any case) with a host, and a port if any from 1."""
    value = environ.get(name, "").strip() or default
    if not _is_http_url(value):
        raise SettingsError(
            f"{name}={_shown(value)} is not allowed; use an http:// or https:// URL with a host "
            "(and a port from 1 to 65535, if any)"
        )
    return value


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        port = parts.port  # refuses anything but ASCII digits up to 65535
    except ValueError:  # such as an unclosed "[" or an IPv6 address that is not one
        return False
    host = parts.hostname or ""
    if parts.scheme not in URL_SCHEMES or not host or port == 0:  # urlsplit lowers the scheme
        return False
    if "[" in parts.netloc:
        return _is_ipv6(host)
    return REGISTERED_HOST_NAME.fullmatch(host) is not None


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _without_password(url: str) -> str:
    """The URL as it may be logged: a password in it is replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user_and_host = parts.netloc.rpartition("@")
    user = user_and_host[0].partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{user_and_host[2]}").geturl()


def _shown(value: str) -> str:
    """A bad value as the error message quotes it: a long one is cut short."""
    if len(value) <= MAX_SHOWN_LENGTH:
        return repr(value)
    return f"{value[:MAX_SHOWN_LENGTH]!r}... ({len(value)} characters)"
