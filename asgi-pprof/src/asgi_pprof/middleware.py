"""The profiler as ASGI middleware, for services with no `mount`: it answers the paths under
`prefix` and passes everything else on to the application it wraps.

    app = PprofMiddleware(app)                           # /debug/pprof/...
    app = PprofMiddleware(app, prefix="/internal/pprof") # anywhere else
    app = PprofMiddleware(app, pprof=PprofApp(frames=16))
"""

from __future__ import annotations

from asgi_pprof.asgi import ASGIApp, Receive, Scope, Send
from asgi_pprof.handlers import PprofApp

DEFAULT_PREFIX = "/debug/pprof"


class PprofMiddleware:
    def __init__(
        self, app: ASGIApp, prefix: str = DEFAULT_PREFIX, pprof: PprofApp | None = None
    ) -> None:
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"prefix must start with / and not end with one, not {prefix!r}")
        self.app = app
        self.prefix = prefix
        self.pprof = pprof if pprof is not None else PprofApp()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            root_path: str = scope.get("root_path", "")
            path: str = scope["path"]
            # As Starlette mounts: `path` stays whole, `root_path` grows by the prefix. Servers
            # differ on whether `path` includes the server's own root_path; both are handled.
            below = path[len(root_path) :] if path.startswith(root_path) else path
            if below == self.prefix or below.startswith(self.prefix + "/"):
                if not path.startswith(root_path):
                    path = root_path + path
                mounted = {**scope, "path": path, "root_path": root_path + self.prefix}
                await self.pprof(mounted, receive, send)
                return
        await self.app(scope, receive, send)
