"""HTTP server that mounts every fake vendor plus the ``/_sandbox`` control API.

Standard library only: a `ThreadingHTTPServer` speaking HTTP/1.1 keep-alive,
one thread per connection, one lock around `SandboxState`.

Example::

    with Sandbox(port=0) as sandbox:
        base = sandbox.base_urls["loops"]          # http://127.0.0.1:PORT/loops/api/v1
        httpx.post(f"{base}/events/send", json={...},
                   headers={"Authorization": "Bearer sandbox-loops-key"})
        SandboxClient(sandbox.url).requests(vendor="loops")
        SandboxClient(sandbox.url).state("loops")  # {"ada@example.com": {"properties": ..., "writes": 1}}

Control API under ``/_sandbox``: ``GET /health``, ``GET /requests`` (filters vendor,
since, status, limit), ``GET /stats``, ``GET /state`` (filters vendor, person: the
final state per vendor and person, see `state`), ``GET``/``POST /config``, ``POST /reset``.

Vendor request pipeline (see `SandboxApp.vendor_request`): at arrival (when the
request reached the host, the kernel's stamp: `_StampedSocket`): record
(with the credential check's result, false while the vendor's ``revoke_key`` is on),
take an injected failure (fail_all, fail_next: the first entry without a
``match`` or whose ``match`` is in the body or Idempotency-Key), count an authenticated request
against the rate limit (see `state` for the modes); then the latency sleep ->
the injected failure -> auth (the vendor's own 401, revoked key or not) -> rate limit (429) -> idempotency (409) ->
route/validate -> (2xx) the person writes it made, kept with its arrival ``seq``.
A vendor with ``rate_limit_headers`` (Loops) adds
``x-ratelimit-limit`` and ``x-ratelimit-remaining`` to every answer while a
limit is set.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from .base import PersonWrite, VendorAPI, error
from .convertloop import ConvertLoopAPI
from .conveyour import ConveYourAPI
from .loops import LoopsAPI
from .state import SandboxState

__all__ = [
    "CONTROL_PREFIX",
    "DEFAULT_HOST",
    "SANDBOX_CREDENTIALS",
    "VENDOR_APIS",
    "Sandbox",
    "SandboxApp",
    "base_urls",
]

# Every vendor the sandbox serves; a new vendor = a new module + one entry here.
VENDOR_APIS: list[type[VendorAPI]] = [ConvertLoopAPI, LoopsAPI, ConveYourAPI]
# Default credentials, keyed by the environment variable that overrides them.
SANDBOX_CREDENTIALS: dict[str, str] = {
    key: value for api in VENDOR_APIS for key, value in api.credential_defaults.items()
}
# Interface the sandbox binds to by default (loopback only).
DEFAULT_HOST = "127.0.0.1"
# Path prefix of the control API.
CONTROL_PREFIX = "/_sandbox"
# Request bodies larger than this are refused with 413.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Idle keep-alive connections are closed after this many seconds.
IDLE_TIMEOUT = 120.0
# Pending-connection backlog (the stdlib default of 5 is too small under load).
LISTEN_BACKLOG = 1024
# How often serve_forever checks for shutdown, in seconds.
POLL_INTERVAL = 0.05

#: (status, JSON body, extra headers)
Reply = tuple[int, Any, list[tuple[str, str]]]
#: A vendor's reply and the person writes it made (none unless its route answered 2xx).
_VendorReply = tuple[int, Any, list[tuple[str, str]], list[PersonWrite]]


def base_urls(url: str) -> dict[str, str]:
    """Vendor name -> base URL of that vendor on a sandbox at ``url``.

    >>> base_urls("http://127.0.0.1:8900")["loops"]
    'http://127.0.0.1:8900/loops/api/v1'
    """
    root = url.rstrip("/")
    return {api.name: root + api.prefix for api in VENDOR_APIS}


def resolve_credentials(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Defaults, overridden by the environment, overridden by ``overrides``."""
    creds = {key: os.environ.get(key, default) for key, default in SANDBOX_CREDENTIALS.items()}
    creds.update(overrides or {})
    return creds


class SandboxApp:
    """Transport-independent request dispatcher: vendors + control API."""

    def __init__(self, vendors: Iterable[VendorAPI]) -> None:
        self.vendors: dict[str, VendorAPI] = {v.name: v for v in vendors}
        # Longest prefix first so nested prefixes would resolve correctly.
        self._mounts = sorted(self.vendors.values(), key=lambda v: len(v.prefix), reverse=True)
        self.state = SandboxState(self.vendors, apis=self.vendors)
        # Set while the server stops: a request still waiting out its latency stops waiting.
        self.stopping = threading.Event()

    def dispatch(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes, arrived: float | None = None
    ) -> Reply:
        """Answer one HTTP request.  ``headers`` has lower-case names; ``arrived`` is when it reached
        the host (`time.time` seconds, the kernel's receive stamp), now if not given."""
        if path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            return self.control_request(method, path[len(CONTROL_PREFIX) :], query, body)
        for vendor in self._mounts:
            if path == vendor.prefix or path.startswith(vendor.prefix + "/"):
                route = path[len(vendor.prefix) :] or "/"
                return self.vendor_request(vendor, method, route, query, headers, body, arrived)
        mounts = {v.name: v.prefix for v in self.vendors.values()}
        status, payload = error(404, f"No vendor mounted at {path}", mounts=mounts, control=CONTROL_PREFIX)
        return status, payload, []

    # -- vendors ----------------------------------------------------------

    def vendor_request(
        self,
        vendor: VendorAPI,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        arrived: float | None = None,
    ) -> Reply:
        state, name = self.state, vendor.name
        idem_key = headers.get("idempotency-key")
        record = state.begin(name, method, path, query, headers, body, vendor.check_auth(headers), idem_key, arrived)
        extra: list[tuple[str, str]]
        writes: list[PersonWrite]
        status, payload, extra, writes = 500, None, [], []
        try:
            status, payload, extra, writes = self._vendor_reply(
                vendor, record, method, path, headers, body, idem_key
            )
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - defensive: never kill the connection thread
            status, payload = error(500, f"sandbox bug: {type(exc).__name__}: {exc}")
        finally:
            state.finish(record, status, writes)
        return status, payload, extra

    def _vendor_reply(
        self,
        vendor: VendorAPI,
        record: dict[str, Any],
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        idem_key: str | None,
    ) -> _VendorReply:
        state, name = self.state, vendor.name
        # Decided at arrival (when the record was made), answered after the latency.
        failure = state.take_failure(name, body.decode("utf-8", "replace") + "\n" + (idem_key or ""))
        # The rate limit counts the request at its arrival (the record's ``ts``), on the monotonic clock.
        at = time.monotonic() - max(0.0, time.time() - record["ts"])
        retry_after = state.take_token(name, at) if failure is None and record["auth_ok"] else None
        limit_headers = state.rate_limit_headers(name, at) if vendor.rate_limit_headers else []
        delay = state.latency(name)
        if delay > 0:
            self.stopping.wait(delay)  # a long latency (a hanging vendor) holds only this connection's thread
        if failure is not None:
            extra = [("Retry-After", failure.retry_after)] if failure.retry_after is not None else []
            payload = failure.body
            if payload is None:
                _, payload = error(failure.status, f"Injected failure (HTTP {failure.status})")
            return failure.status, payload, extra + limit_headers, []
        if not record["auth_ok"]:
            return (*vendor.unauthorized(), limit_headers, [])
        if retry_after is not None:
            status, payload = error(429, "Rate limit exceeded")
            return status, payload, [("Retry-After", retry_after), *limit_headers], []
        route = (method.upper(), path.rstrip("/") or "/")
        if idem_key is not None and route in vendor.idempotent_routes:
            if not state.reserve_idempotency_key(name, idem_key):
                return (*vendor.idempotency_conflict(), limit_headers, [])
            status, payload = 500, None
            try:
                status, payload = vendor.handle(method, path, headers, body)
            finally:
                state.settle_idempotency_key(name, idem_key, succeeded=status == 200)
        else:
            status, payload = vendor.handle(method, path, headers, body)
        # Only what the vendor's route accepted changes /_sandbox/state.
        writes = vendor.person_writes(route[0], route[1], record["body"], idem_key) if 200 <= status < 300 else []
        return status, payload, limit_headers, writes

    # -- control API ------------------------------------------------------

    def control_request(self, method: str, path: str, query: str, body: bytes) -> Reply:
        path = path.rstrip("/")
        routes = {
            "/health": ("GET", lambda: (200, {"ok": True})),
            "/requests": ("GET", lambda: self._requests(query)),
            "/stats": ("GET", lambda: (200, self.state.stats())),
            "/state": ("GET", lambda: self._person_states(query)),
            "/config": ("POST", lambda: self._configure(body)),
            "/reset": ("POST", self._reset),
        }
        if path == "/config" and method == "GET":
            return 200, {"vendors": {v: self.state.config(v) for v in self.vendors}}, []
        if path not in routes:
            status, payload = error(404, f"No control endpoint {CONTROL_PREFIX}{path}", endpoints=sorted(routes))
            return status, payload, []
        allowed, action = routes[path]
        if method != allowed:
            status, payload = error(405, f"Use {allowed} for {CONTROL_PREFIX}{path}")
            return status, payload, [("Allow", allowed)]
        status, payload = action()
        return status, payload, []

    def _requests(self, query: str) -> tuple[int, Any]:
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        unknown = set(params) - {"vendor", "since", "status", "limit"}
        if unknown:
            return error(400, f"unknown filters: {sorted(unknown)}")
        ints: dict[str, int | None] = {}
        for key in ("since", "status", "limit"):
            try:
                ints[key] = int(params[key]) if key in params else None
            except ValueError:
                return error(400, f"{key} must be an integer")
        vendor = params.get("vendor")
        if vendor is not None and vendor not in self.vendors:
            return error(400, f"unknown vendor {vendor!r}; known: {sorted(self.vendors)}")
        return 200, {"requests": self.state.requests(vendor=vendor, **ints)}

    def _person_states(self, query: str) -> tuple[int, Any]:
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        unknown = set(params) - {"vendor", "person"}
        if unknown:
            return error(400, f"unknown filters: {sorted(unknown)}")
        vendor = params.get("vendor")
        if vendor is not None and vendor not in self.vendors:
            return error(400, f"unknown vendor {vendor!r}; known: {sorted(self.vendors)}")
        return 200, self.state.person_states(vendor=vendor, person=params.get("person"))

    def _configure(self, body: bytes) -> tuple[int, Any]:
        try:
            changes = json.loads(body)
        except ValueError:
            return error(400, "config body must be valid JSON")
        if not isinstance(changes, dict):
            return error(400, "config body must be a JSON object")
        vendor = changes.pop("vendor", None)
        targets = list(self.vendors) if vendor == "*" else [vendor]
        if vendor != "*" and vendor not in self.vendors:
            return error(400, f"'vendor' must be one of {sorted(self.vendors)} or '*', got {vendor!r}")
        try:
            # Invalid switches fail on the first target, before any vendor changed.
            configs = {v: self.state.configure(v, changes) for v in targets}
        except ValueError as exc:
            return error(400, str(exc))
        return 200, ({"vendors": configs} if vendor == "*" else configs[vendor])

    def _reset(self) -> tuple[int, Any]:
        self.state.reset()
        return 200, {"ok": True}


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP/1.1 adapter around `SandboxApp.dispatch`."""

    protocol_version = "HTTP/1.1"
    server_version = "VendorSandbox/1.0"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.stamps = _StampedSocket.over(self.connection)
        if self.stamps is not None:
            self.rfile.close()  # the stdlib's reader: its open file would keep the socket from closing
            self.rfile = io.BufferedReader(self.stamps, max(io.DEFAULT_BUFFER_SIZE, 65536))
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def do_GET(self) -> None:
        try:
            body = self._read_body()
            # When its last byte reached this host (the kernel's stamp), not when this thread got to it.
            arrived = self.stamps.arrived if self.stamps is not None else None
        except ValueError as exc:
            self.close_connection = True
            status, payload = error(413 if "too large" in str(exc) else 400, str(exc))
            self._send(status, payload, [])
            return
        path, _, query = self.path.partition("?")
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            status, payload, extra = self.server.app.dispatch(self.command, path, query, headers, body, arrived)
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - defensive
            status, payload, extra = 500, {"success": False, "message": f"sandbox bug: {exc!r}"}, []
        try:
            self._send(status, payload, extra)
        except OSError:  # the client went away (e.g. gave up on a long latency): nobody to answer
            self.close_connection = True

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if not length_header:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise ValueError("invalid Content-Length") from None
        if length < 0:
            raise ValueError("invalid Content-Length")
        if length > MAX_BODY_BYTES:
            raise ValueError("request body too large")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ValueError("invalid chunked encoding") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise ValueError("request body too large")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _send(self, status: int, payload: Any, extra: list[tuple[str, str]]) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        reason = self.responses.get(status, ("",))[0]
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Server: {self.server_version}",
            f"Date: {_http_date()}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in extra)
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        self.wfile.write(head + body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence per-request logging (it would dominate the cost of a request)."""


# SO_TIMESTAMPNS (Linux): every read also returns when the kernel received the data read.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform.startswith("linux") else None)
_STAMP_SPACE = socket.CMSG_SPACE(16)


class _StampedSocket(io.RawIOBase):
    """A connection's reads, each keeping the kernel's receive time of the data it returned.

    A vendor counts a request against its limit when the request reaches it. This process is
    one of several on the same CPUs: its handler thread may read a request tens of milliseconds
    after it arrived, and counting then would judge the client by this process' scheduling.
    ``arrived`` is the `time.time` second at which the kernel received the latest data read.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.arrived: float | None = None

    @classmethod
    def over(cls, sock: socket.socket) -> _StampedSocket | None:
        """Reads of ``sock`` with receive stamps; None where the platform has none."""
        if _SO_TIMESTAMPNS is None:
            return None
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        except OSError:
            return None
        return cls(sock)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n, ancillary, _flags, _addr = self.sock.recvmsg_into([buffer], _STAMP_SPACE)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
                seconds, nanoseconds = struct.unpack("qq", data[:16])
                self.arrived = seconds + nanoseconds / 1e9
        return n


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """RFC 7231 date of the current second, cached per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], app: SandboxApp) -> None:
        self.app = app
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        #: Connections accepted since the start (a client that reuses its keep-alive connections opens few).
        self.accepted = 0
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, is_open: bool) -> None:
        with self._connections_lock:
            (self._connections.add if is_open else self._connections.discard)(conn)
            self.accepted += is_open

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (reset, broken pipe) is no sandbox error; print the rest."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut down open keep-alive connections so their threads exit."""
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Sandbox:
    """The sandbox server, served from a daemon thread.

    Credentials come from the environment (see `SANDBOX_CREDENTIALS` for the
    variable names and defaults), overridden by ``credentials``.

    Example::

        sandbox = Sandbox(port=0).start()
        print(sandbox.url, sandbox.base_urls["conveyour"])
        sandbox.stop()
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = 0, credentials: Mapping[str, str] | None = None) -> None:
        self.host = host
        self.port = port
        self.credentials = resolve_credentials(credentials)
        self.app = SandboxApp(api(self.credentials) for api in VENDOR_APIS)
        self.state = self.app.state
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Sandbox:
        """Bind and serve in a daemon thread; returns self."""
        if self._server is not None:
            raise RuntimeError("sandbox already started")
        self._server = _Server((self.host, self.port), self.app)
        self.app.stopping.clear()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name=f"sandbox-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end latency waits, close keep-alive connections and release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        self.app.stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since :meth:`start` (0 before)."""
        return self._server.accepted if self._server is not None else 0

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:54321`` (port known after `start`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_urls(self) -> dict[str, str]:
        """Vendor name -> base URL."""
        return base_urls(self.url)

    def __enter__(self) -> Sandbox:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
