"""Go's /debug/pprof/ for Python ASGI services, read by the real `go tool pprof`.

    from asgi_pprof import PprofApp
    app.mount("/debug/pprof", PprofApp())       # FastAPI, Starlette: any framework that mounts
    app = PprofMiddleware(app)                  # or around any ASGI app
    start_sampling()                            # optional: Go's sampled heap and allocs profiles
    app = LabelMiddleware(app)                  # its samples labelled by route and method

Split like Go's own packages: `handlers` is net/http/pprof (HTTP, its doc comment the manual);
`heap` (tracemalloc), `sampling` (the sampling heap profiler), `goroutine`, `cpu` capture,
`symbolize` names frames, `profile`, `protobuf` and `sampled_profile` encode, `reader` reads
profiles back: runtime/pprof.
"""

from asgi_pprof.handlers import PprofApp
from asgi_pprof.heap import start_tracing
from asgi_pprof.labels import LabelMiddleware, labelled
from asgi_pprof.middleware import PprofMiddleware
from asgi_pprof.sampling import SamplingUnavailable
from asgi_pprof.sampling import start as start_sampling
from asgi_pprof.sampling import stop as stop_sampling

__all__ = [
    "LabelMiddleware",
    "PprofApp",
    "PprofMiddleware",
    "SamplingUnavailable",
    "labelled",
    "start_sampling",
    "start_tracing",
    "stop_sampling",
]
__version__ = "0.1.0"
