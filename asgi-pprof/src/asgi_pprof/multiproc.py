"""One profile for a service run as several worker processes (`uvicorn --workers N`, gunicorn's
uvicorn worker), in the manner of prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR).

With PPROF_MULTIPROC_DIR set to a directory that every worker can write:

- each worker serves its own profiles on a unix socket, `<dir>/<pid>.sock`, from a thread of its
  own. A request that arrives there runs in the worker's event loop, as an HTTP request would:
  the same handlers, the CPU profile's signal handler in the main thread, the goroutine capture
  in the loop's thread;
- the worker that receives an HTTP request for `heap`, `allocs`, `goroutine` or `profile` asks
  every socket in the directory for the same path and query, at once, and answers for itself
  without a socket; each answer is decoded and `merge` makes them one profile whose samples carry
  their worker's `pid` label (texts, `debug=1` and `debug=2`, come one after the other, each
  under a `# pid N` line). A `seconds=N` window runs in every worker at once: each takes its own
  growth, and the growths are merged;
- a worker that does not answer within the profile's own duration plus
  PPROF_MULTIPROC_TIMEOUT_SECONDS (default 2), or answers an error, is named in the answer: the
  `X-Pprof-Workers-Failed` header and a comment of the profile (a `#` line of a text). The pids
  merged are in `X-Pprof-Workers`;
- a worker that has exited leaves its socket behind only until the next request or worker start:
  a socket that refuses connections has nobody listening, and is removed.

The socket speaks a minimal HTTP/1.1 (`curl --unix-socket <dir>/<pid>.sock http://w/heap`).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import re
import secrets
import sys
import threading
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path

from asgi_pprof.asgi import Answer, ASGIApp, Message, Scope

logger = logging.getLogger("asgi_pprof")

DIR_VARIABLE = "PPROF_MULTIPROC_DIR"
TIMEOUT_VARIABLE = "PPROF_MULTIPROC_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_SECONDS = 2  # under what Parca (3 s) and Alloy leave beyond a CPU profile
MAX_TIMEOUT_SECONDS = 300
MAX_ANSWER_BYTES = 256 << 20  # a worker's profile: far more than any has
MAX_HEAD_BYTES = 64 << 10
HEAD_TIMEOUT_SECONDS = 10.0  # for a request's head on a worker's socket
_SOCKET_PATH_MAX = 107  # sockaddr_un's sun_path, less its NUL
_SET_BY_ANSWER = ("content-type", "content-length", "connection")
_SOCKET_NAME = re.compile(r"([0-9]{1,10})\.sock")


class MultiprocConfigError(ValueError):
    """PPROF_MULTIPROC_DIR or PPROF_MULTIPROC_TIMEOUT_SECONDS cannot be used: the message says
    which, and what would do."""


def directory_from_environ(environ: Mapping[str, str] = os.environ) -> Path | None:
    """PPROF_MULTIPROC_DIR: None when unset or empty; else an existing directory this process can
    write and search, with room for a socket's path in it (MultiprocConfigError otherwise)."""
    value = environ.get(DIR_VARIABLE, "")
    if not value:
        return None
    directory = Path(value).absolute()
    if not directory.is_dir():
        raise MultiprocConfigError(
            f"{DIR_VARIABLE}={value!r} is not an existing directory; create it before the "
            "workers start (one directory per service), or unset it"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise MultiprocConfigError(f"{DIR_VARIABLE}={value!r} is not writable by this process")
    if len(os.fsencode(directory / f".{2**32}.{'0' * 8}.sock")) > _SOCKET_PATH_MAX:
        raise MultiprocConfigError(
            f"{DIR_VARIABLE}={value!r} is too long for a unix socket's path in it (at most "
            f"{_SOCKET_PATH_MAX - 25} bytes): use a shorter path"
        )
    return directory


def timeout_from_environ(environ: Mapping[str, str] = os.environ) -> int:
    """PPROF_MULTIPROC_TIMEOUT_SECONDS, or 2; MultiprocConfigError if it is not a whole number of
    seconds from 1 to 300."""
    value = environ.get(TIMEOUT_VARIABLE, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_SECONDS
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_TIMEOUT_SECONDS):
        raise MultiprocConfigError(
            f"{TIMEOUT_VARIABLE}={value!r} is not allowed; use an integer from 1 to "
            f"{MAX_TIMEOUT_SECONDS} (seconds a worker has to answer, beyond the profile's own)"
        )
    return int(value)


@dataclass
class Gathered:
    """What the workers answered (this worker's first), and those that did not, with why."""

    answers: list[tuple[int, Answer]]
    failures: list[tuple[int, str]]
    notes: list[str]  # what else happened: sockets of exited workers removed


class Workers:
    """This worker's socket, and asking every worker of the directory for a profile."""

    def __init__(self, directory: Path, app: ASGIApp, timeout_seconds: int) -> None:
        self.directory = directory
        self.timeout_seconds = timeout_seconds
        self._app = app  # answers here only: never fans out again
        self._endpoint: _Endpoint | None = None
        self._lock = threading.Lock()
        self.ensure_serving()

    def ensure_serving(self) -> None:
        """Serve this process's socket: started once per process (a forked copy starts its own)."""
        endpoint = self._endpoint
        if endpoint is not None and endpoint.pid == os.getpid():
            return
        with self._lock:
            if self._endpoint is None or self._endpoint.pid != os.getpid():
                _remove_exited(self.directory)
                self._endpoint = _Endpoint(self.directory, self._app)
                self._endpoint.start()

    def pids(self) -> list[int]:
        """The workers whose sockets are in the directory now."""
        return [pid for pid, _ in _sockets(self.directory)]

    def note_serving_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop this worker serves HTTP in: where its socket's requests run."""
        if self._endpoint is not None:
            self._endpoint.serving_loop = loop

    async def gather(self, target: str, seconds: float, here: Awaitable[Answer]) -> Gathered:
        """`here`'s answer and every other worker's to `target` (a path and query), each
        given `seconds` (the profile's own duration) plus the timeout."""
        self.ensure_serving()
        own = os.getpid()
        timeout = seconds + self.timeout_seconds
        asked = [
            asyncio.ensure_future(_ask_peer(pid, path, target, timeout))
            for pid, path in _sockets(self.directory)
            if pid != own
        ]
        try:
            answers = [(own, await here)]
            results = await asyncio.gather(*asked)
        finally:
            for task in asked:
                task.cancel()
        gathered = Gathered(answers, [], [])
        for pid, result in results:
            if isinstance(result, Answer):
                gathered.answers.append((pid, result))
            elif result is _EXITED:
                gathered.notes.append(f"worker {pid} had exited: its socket was removed")
            else:
                gathered.failures.append((pid, result))
        return gathered


_EXITED = "exited"


async def _ask_peer(pid: int, path: Path, target: str, timeout: float) -> tuple[int, Answer | str]:
    try:
        async with asyncio.timeout(timeout):
            return pid, await _ask(path, target)
    except ConnectionRefusedError:  # nobody listens: the worker has exited
        _unlink(path)
        return pid, _EXITED
    except FileNotFoundError:  # removed meanwhile, by another worker
        return pid, _EXITED
    except TimeoutError:
        return pid, f"did not answer in {timeout:g} s"
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
        return pid, f"failed: {type(error).__name__}: {error}"


async def _ask(path: Path, target: str) -> Answer:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_HEAD_BYTES)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nhost: asgi-pprof\r\n\r\n".encode("latin-1"))
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *header_lines = head.split("\r\n")[:-2]
        status = int(status_line.split(" ", 2)[1])
        headers = [line.split(":", 1) for line in header_lines]
        fields = {name.strip().lower(): value.strip() for name, value in headers}
        length = int(fields.get("content-length", "-1"))
        if not 0 <= length <= MAX_ANSWER_BYTES:
            raise ValueError(f"an answer of {length} bytes")
        body = await reader.readexactly(length)
    finally:
        writer.close()
    kept = [(name, value) for name, value in fields.items() if name not in _SET_BY_ANSWER]
    return Answer(status, body, fields.get("content-type", ""), kept)


def _sockets(directory: Path) -> list[tuple[int, Path]]:
    """Every worker socket in the directory, by pid."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _SOCKET_NAME.fullmatch(entry.name)
            if match:
                found.append((int(match[1]), Path(entry.path)))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def _remove_exited(directory: Path) -> None:
    """Sockets (and half-made ones) of processes that have exited: nothing grows with restarts."""
    try:
        with os.scandir(directory) as entries:
            names = [entry.name for entry in entries]
    except OSError:
        return
    for name in names:
        match = re.fullmatch(r"\.?([0-9]{1,10})\.(?:[0-9a-f]{8}\.)?sock", name)
        if match and not _alive(int(match[1])):
            _unlink(directory / name)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class _Endpoint:
    """This worker's socket, served from a thread with an event loop of its own."""

    def __init__(self, directory: Path, app: ASGIApp) -> None:
        self.pid = os.getpid()
        self.path = directory / f"{self.pid}.sock"
        self.app = app
        self.serving_loop: asyncio.AbstractEventLoop | None = _running_loop_in_main_thread()
        self._bound = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        thread = threading.Thread(
            target=self._run, name=f"asgi_pprof: worker socket {self.path.name}", daemon=True
        )
        thread.start()
        self._bound.wait(HEAD_TIMEOUT_SECONDS)
        if self._error is not None:
            raise MultiprocConfigError(f"{DIR_VARIABLE}: cannot serve {self.path}: {self._error}")
        atexit.register(self._remove, self.pid)

    def _remove(self, pid: int) -> None:
        if os.getpid() == pid:  # not in a forked copy, whose parent still serves it
            _unlink(self.path)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # the worker goes on; its profiles are missing, and said so
            self._error = error
            self._bound.set()
            logger.error("asgi_pprof: the worker socket %s stopped: %r", self.path, error)

    async def _serve(self) -> None:
        # Bound under a temporary name, then renamed: a socket under its final name always
        # listens, so that a refused connection means an exited worker.
        temporary = self.path.with_name(f".{self.pid}.{secrets.token_hex(4)}.sock")
        server = await asyncio.start_unix_server(
            self._handle, path=str(temporary), limit=MAX_HEAD_BYTES
        )
        os.replace(temporary, self.path)
        self._bound.set()
        async with server:
            await server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            answer = await self._answer(method, target, reader)
            if answer is not None:
                writer.write(answer)
                await writer.drain()
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the asking worker has gone, or this was not a request
        except asyncio.LimitOverrunError:
            pass
        finally:
            writer.close()

    async def _answer(self, method: str, target: str, reader: asyncio.StreamReader) -> bytes | None:
        path, _, query = target.partition("?")
        name = path.rstrip("/").rsplit("/", 1)[-1]
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": f"/{name}",
            "raw_path": f"/{name}".encode("latin-1"),
            "root_path": "",
            "query_string": query.encode("latin-1"),
            "headers": [],
        }
        gone: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def watch() -> None:
            try:
                while await reader.read(4096):
                    pass
            finally:
                _set(gone)

        watcher = asyncio.create_task(watch())
        try:
            answering = _answer_in_loop(self.app, scope, gone)
            loop = self._loop_to_answer_in()
            if loop is None or loop is asyncio.get_running_loop():
                return await answering
            future = asyncio.run_coroutine_threadsafe(answering, loop)
            try:
                return await asyncio.wrap_future(future)
            finally:
                future.cancel()
        finally:
            watcher.cancel()

    def _loop_to_answer_in(self) -> asyncio.AbstractEventLoop | None:
        """The worker's serving loop, found in its main thread if nobody said which it is;
        None (answer in the socket's own loop) where there is none."""
        loop = self.serving_loop
        if loop is None or loop.is_closed() or not loop.is_running():
            loop = self.serving_loop = _running_loop_in_main_thread()
        return loop


def _set(future: concurrent.futures.Future[None]) -> None:
    try:
        future.set_result(None)
    except concurrent.futures.InvalidStateError:  # already set
        pass


async def _answer_in_loop(
    app: ASGIApp, scope: Scope, gone: concurrent.futures.Future[None]
) -> bytes | None:
    """`app`'s answer to `scope` as HTTP/1.1 bytes; None if the asking worker went first."""
    loop = asyncio.get_running_loop()
    left = asyncio.Event()
    gone.add_done_callback(lambda _: _call_soon(loop, left.set))
    delivered = False
    messages: list[Message] = []

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope, receive, send)
    if not messages or messages[0]["type"] != "http.response.start":
        return None
    start = messages[0]
    lines = [f"HTTP/1.1 {start['status']} -".encode()]
    lines += [name + b": " + value for name, value in start.get("headers", [])]
    lines.append(b"connection: close")
    body = b"".join(message.get("body", b"") for message in messages[1:])
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _call_soon(loop: asyncio.AbstractEventLoop, callback: object) -> None:
    try:
        loop.call_soon_threadsafe(callback)  # type: ignore[arg-type]
    except RuntimeError:  # the loop has closed: nobody waits any more
        pass


def _running_loop_in_main_thread() -> asyncio.AbstractEventLoop | None:
    """The event loop the main thread runs: held by one of its frames, as itself or as the loop
    of an `asyncio.Runner` (asyncio.run, uvicorn, gunicorn's uvicorn worker). Types are tested
    with `type()`: `isinstance` would read a proxy's `__class__`, which may run code."""
    main = threading.main_thread()
    if threading.current_thread() is main:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None
    frame = sys._current_frames().get(main.ident or 0)
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if issubclass(type(value), asyncio.Runner):
                value = vars(value).get("_loop")
            if issubclass(type(value), asyncio.AbstractEventLoop) and value.is_running():
                return value
        frame = frame.f_back
    return None
