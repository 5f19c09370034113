"""Go's /debug/pprof/ for Python ASGI services, read by the real `go tool pprof`.

    from asgi_pprof import PprofApp
    app.mount("/debug/pprof", PprofApp())       # FastAPI, Starlette: any framework that mounts
    app = PprofMiddleware(app)                  # or around any ASGI app

Split like Go's own packages: `handlers` is net/http/pprof (HTTP, its doc comment the manual);
`heap`, `goroutine`, `cpu` capture, `symbolize` names frames, `profile` and `protobuf` encode,
`reader` reads profiles back: runtime/pprof.
"""

from asgi_pprof.handlers import PprofApp
from asgi_pprof.heap import start_tracing
from asgi_pprof.middleware import PprofMiddleware

__all__ = ["PprofApp", "PprofMiddleware", "start_tracing"]
__version__ = "0.1.0"
