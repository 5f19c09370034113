"""Go-style /debug/pprof/ endpoints for Python ASGI services, read by the real `go tool pprof`.

Split like Go's own packages: `handlers` is net/http/pprof (HTTP), the rest is runtime/pprof
(`heap` captures, `symbolize` names frames, `profile` and `protobuf` encode).
"""

from app.pprof.handlers import PprofApp
from app.pprof.heap import start_tracing

__all__ = ["PprofApp", "start_tracing"]
