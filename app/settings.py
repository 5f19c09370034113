"""Settings read from the environment once, at startup, and validated there.

A bad value stops the process with a message that names the variable and what it accepts, so a
typo in a compose file fails loudly instead of running the wrong experiment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

LEAK_MODES = ("leaky", "fixed")
TRACES_EXPORTERS = ("zipkin", "console", "none")
TRACEMALLOC_STARTS = ("startup", "on-demand")
HEAP_PROFILERS = ("tracemalloc", "sampling")
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot run with."""


@dataclass(frozen=True)
class Settings:
    leak_mode: str = "leaky"
    service_name: str = "leaker"
    traces_exporter: str = "zipkin"
    zipkin_endpoint: str = "http://localhost:9411/api/v2/spans"
    pprof_enabled: bool = True
    tracemalloc_start: str = "on-demand"
    tracemalloc_frames: int = 8  # the leak's deepest stack reaches app/main.py in 6 frames
    heap_profiler: str = "tracemalloc"
    mem_profile_rate: int = 524288  # Go's runtime.MemProfileRate: one sample per 512 KiB

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
        )


def _choice(environ: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = environ.get(name, "").strip().lower() or default
    if value not in allowed:
        allowed_values = ", ".join(allowed)
        raise SettingsError(
            f"{name}={environ[name]!r} is not allowed; use one of: {allowed_values}"
        )
    return value


def _boolean(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in BOOLEANS:
        raise SettingsError(f"{name}={environ[name]!r} is not allowed; use true or false")
    return BOOLEANS[value]


def _integer(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise SettingsError(f"{name}={value!r} is not allowed; use an integer from {low} to {high}")
    return int(value)


def _url(environ: Mapping[str, str], name: str, default: str) -> str:
    value = environ.get(name, "").strip() or default
    if not value.startswith(("http://", "https://")):
        raise SettingsError(f"{name}={value!r} is not allowed; use an http:// or https:// URL")
    return value
