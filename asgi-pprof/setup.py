"""The sampling heap profiler's C extension; everything else is in pyproject.toml.

The extension is optional: where it cannot be built (no C compiler, not CPython, not POSIX), the
library installs without it and the heap profile comes from tracemalloc, as `asgi_pprof.sampling`
explains when asked to start. On CPython versions it does not support, it builds a stub whose
import says why.
"""

import os
import platform

from setuptools import Extension, setup

ext_modules = []
if platform.python_implementation() == "CPython" and os.name == "posix":
    ext_modules.append(
        Extension(
            "asgi_pprof._memprof",
            sources=["src/asgi_pprof/_memprof.c"],
            depends=["src/asgi_pprof/_memprof_python.h"],
            extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-Werror"],
            libraries=["m"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
