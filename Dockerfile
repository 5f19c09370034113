# The leaker service in a container; `docker compose up` builds it (see docker-compose.yml) and
# runs it as both `leaker` and `client`.

# Build stage: wheels of the profiler library (which may compile C code: this image has gcc and
# the Python headers) and of the project.
FROM python:3.11.13-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY asgi-pprof ./asgi-pprof
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip wheel --no-deps --wheel-dir /wheels ./asgi-pprof .

# Run stage: no compiler, the pinned lock, then the two wheels.
FROM python:3.11.13-slim-bookworm

# PPROF_TRACEMALLOC=startup: tracemalloc runs from the start, so /debug/pprof/heap answers at once,
# as `go tool pprof http://localhost:8080/debug/pprof/heap` does against the Go demo.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PPROF_HEAP_PROFILER=sampling \
    PPROF_TRACEMALLOC=startup

# A numeric USER below lets a runtime check that it is not root without reading /etc/passwd.
RUN useradd --create-home --uid 10001 leaker

WORKDIR /srv/leaker

# The pinned lock first, without its one local line (the profiler library, a wheel from the build
# stage): this layer is reused until requirements.txt changes.
COPY requirements.txt ./
RUN grep -v '^\./asgi-pprof$' requirements.txt > /tmp/third-party.txt \
    && pip install -r /tmp/third-party.txt && rm /tmp/third-party.txt

# The library and the project, resolving nothing more.
COPY --from=build /wheels /tmp/wheels
# The sampler's C extension is optional to pip, not to this image (PPROF_HEAP_PROFILER=sampling).
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels \
    && python -c "import asgi_pprof._memprof"

USER 10001
EXPOSE 8080

# slim images have no curl; urlopen raises (exit 1) on a refused connection or a non-2xx answer.
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/', timeout=4)"]

CMD ["leaker", "serve", "--host", "0.0.0.0", "--port", "8080"]
