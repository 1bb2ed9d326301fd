"""One Redis client and one vendor HTTP (keep-alive connections on httpcore, httpx's transport layer) per process.

Both are made on first use, thread- and greenlet-safe, so every delivery thread (or greenlet) of a worker shares
them. After a fork the child makes its own (connections must not be shared across processes).

Example::

    >>> from worker.clients import request_timeout
    >>> request_timeout(get_settings())  # doctest: +SKIP
    {'connect': 5.0, 'read': 10.0, 'write': 10.0, 'pool': 10.0}
"""

from __future__ import annotations

import functools
import math
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from json import dumps
from typing import Any, NamedTuple

import httpcore
import httpx
import redis

from . import sockets
from .settings import Settings, get_settings
from .slots import Slots

#: Seconds to wait for a TCP connection to a vendor (the rest of HTTP_TIMEOUT is for the exchange).
CONNECT_TIMEOUT_CAP = 5.0
#: Sent with every vendor request.
USER_AGENT = "vendor-delivery-worker/0.1"
#: Connections per vendor host that stay open while idle (more run at once under load, and are closed after).
IDLE_TRANSPORTS = 256
#: Seconds an idle keep-alive connection is kept (httpx's default).
KEEPALIVE_EXPIRY = 5.0

_lock = threading.Lock()


class _Clients:
    """This process's clients, made on first use; ``pid`` is the process they belong to."""

    pid: int | None = None
    http: VendorHTTP | None = None
    redis: redis.Redis | None = None


_state = _Clients()


def _reset_if_forked() -> None:
    if _state.pid != os.getpid():
        _state.http = _state.redis = None
        _state.pid = os.getpid()


class Reply(NamedTuple):
    """A vendor's answer, read in full: status, headers (names lower-cased), body as text."""

    status: int
    headers: dict[str, str]
    text: str


class Connection:
    """One keep-alive connection to a vendor host (httpcore's ``HTTPConnection``), made again when it is closed or
    expired. An exchange owns it while it runs: it comes from the host's :class:`~worker.slots.Slots`."""

    __slots__ = ("_make", "_conn")

    def __init__(self, make: Callable[[], httpcore.HTTPConnection]) -> None:
        self._make = make
        self._conn = make()

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        conn = self._conn
        # Closed (the vendor said so, or a failed exchange), kept alive too long, or closed by the vendor while
        # idle (the socket reads its end: one 0 s poll): a new connection.
        if conn.is_closed() or conn.has_expired():
            conn.close()
            conn = self._conn = self._make()
        return conn.handle_request(request)

    def close(self) -> None:
        self._conn.close()


class VendorHTTP:
    """Keep-alive connections to the vendors, reused exchange by exchange, per vendor host.

    The exchange runs on httpcore, httpx's own transport layer, without httpx's request and response
    models: building an ``httpx.Request`` (URL parsing, header normalising) and reading an ``httpx.Response``
    cost about a third of a delivery's HTTP CPU, and a delivery needs none of it (its URLs are a vendor's
    base URL and a fixed path, parsed once). Failures are raised as httpx's exceptions.

    Each exchange takes a :class:`Connection` of its own for the vendor's host from a
    :class:`~worker.slots.Slots` pool, and gives it back (open) once the answer is read: as many connections
    exist per host as exchanges ran there at once (a thread's, or a greenlet's: the gevent pool runs each task
    in a new greenlet), and at most ``keep`` stay idle. httpcore's own pool is not used: it looks over all of
    its connections on every request, under a lock, and checks an idle connection's socket twice per exchange.
    The connections talk through :class:`worker.sockets.Backend` (a request in one write, one check, timeouts
    set once) and share one TLS context: loading the CA certificates costs tens of milliseconds of CPU per
    context.
    """

    def __init__(self, keep: int = IDLE_TRANSPORTS) -> None:
        self._keep = keep
        self._hosts: dict[tuple[bytes, bytes, int | None], Slots[Connection]] = {}
        #: When the last exchange with each host ended (monotonic seconds).
        self._last: dict[tuple[bytes, bytes, int | None], float] = {}
        self._lock = threading.Lock()
        # One TLS context for every connection, as httpx makes it (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), made
        # here: making one loads the CA bundle, ~60 ms of CPU under the GIL, which an exchange would otherwise pay
        # after its rate-limit slot.
        self._ssl: ssl.SSLContext = httpx.create_ssl_context()
        self._backend = sockets.Backend()

    def _new_connection(self, origin: httpcore.Origin) -> Connection:
        return Connection(functools.partial(httpcore.HTTPConnection, origin, ssl_context=self._ssl,
                                            keepalive_expiry=KEEPALIVE_EXPIRY, network_backend=self._backend))

    def _slots(self, target: _Target) -> Slots[Connection]:
        slots = self._hosts.get(target.origin)
        if slots is None:
            with self._lock:
                slots = self._hosts.get(target.origin)
                if slots is None:
                    origin = target.url.origin
                    slots = self._hosts[target.origin] = Slots(lambda: self._new_connection(origin), _close,
                                                               self._keep)
        return slots

    def exchange(self, method: str, url: str, headers: Mapping[str, str], json: Any,
                 timeout: Mapping[str, float | None]) -> Reply:
        """Send ``json`` (encoded as httpx encodes it) with ``headers`` and read the answer in full.

        Raises httpx's exceptions: :class:`httpx.TimeoutException`, :class:`httpx.NetworkError` and
        :class:`httpx.RemoteProtocolError` are worth another attempt; any other :class:`httpx.HTTPError` is
        a request that cannot be made.
        """
        target = _target(url)
        if target.url.scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(_unsupported(target.url.scheme))
        body = dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        raw = [(b"Host", target.netloc), *((k.encode("ascii"), v.encode("ascii")) for k, v in headers.items()),
               (b"Content-Type", b"application/json"), (b"Content-Length", str(len(body)).encode())]
        request = httpcore.Request(method.encode("ascii"), target.url, headers=raw, content=body,
                                   extensions={"timeout": timeout})
        slots = self._slots(target)
        conn = slots.take()
        try:
            response = conn.handle_request(request)
            try:
                content = response.read()
            finally:
                response.close()
        except _CORE_ERRORS as exc:
            raise _as_httpx(exc) from exc
        finally:
            slots.give(conn)  # on a failure too: the failed connection closed itself, the next one is made anew
        self._last[target.origin] = time.monotonic()
        return Reply(response.status,
                     {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers},
                     content.decode("utf-8", errors="replace"))

    def warm(self, url: str) -> bool:
        """An exchange with ``url``'s host ended less than half ``KEEPALIVE_EXPIRY`` ago: its connection, left
        open, is at hand for the next exchange there, which then need not connect first (the
        rate limiter's margin for it is the warm one). Asked when a rate-limit slot is reserved, for an
        exchange that comes later: a connection busy now is given back by then, so only the time counts (asking
        for an idle one now made ~5 % of requests at 50/s cold, each holding its place 0.3 s longer)."""
        return time.monotonic() - self._last.get(_target(url).origin, -math.inf) < KEEPALIVE_EXPIRY / 2

    def open_transports(self) -> int:
        """Connections (open or made on their next exchange) that exist now: idle and in use."""
        with self._lock:
            hosts = list(self._hosts.values())
        return sum(s.idle() + s.out() for s in hosts)

    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for slots in hosts:
            slots.close()

    def __enter__(self) -> VendorHTTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(conn: Connection) -> None:
    conn.close()


class _Target(NamedTuple):
    """A URL as an exchange needs it: httpcore's URL, the Host header, and the origin its pools are kept by."""

    url: httpcore.URL
    netloc: bytes
    origin: tuple[bytes, bytes, int | None]


@functools.lru_cache(maxsize=256)
def _target(url: str) -> _Target:
    """Parsed by httpx once per URL: a vendor's base URL and its few fixed paths."""
    u = httpx.URL(url)  # a missing or unsupported scheme is refused by the exchange, in httpcore's own words
    scheme = u.scheme.encode("ascii")
    return _Target(httpcore.URL(scheme=scheme, host=u.raw_host, port=u.port, target=u.raw_path), u.netloc,
                   (scheme, u.raw_host, u.port))


def _unsupported(scheme: bytes) -> str:
    """httpcore's words for a URL it cannot send (its connection pool checks; a single connection does not)."""
    if not scheme:
        return "Request URL is missing an 'http://' or 'https://' protocol."
    return f"Request URL has an unsupported protocol '{scheme.decode()}://'."


#: httpcore's exceptions and httpx's of the same name (the most specific first).
_ERROR_MAP: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.ProxyError, httpx.ProxyError),
)
_CORE_ERRORS = tuple(core for core, _ in _ERROR_MAP)


def _as_httpx(exc: Exception) -> httpx.HTTPError:
    for core, mapped in _ERROR_MAP:
        if isinstance(exc, core):
            return mapped(str(exc))
    raise AssertionError(f"not an httpcore error: {exc!r}")  # pragma: no cover - _CORE_ERRORS is the map's keys


def http_client() -> VendorHTTP:
    """The process's vendor HTTP: keep-alive connections, no retries, no redirects, no cookies, no proxies.

    Not ``httpx.Client``: the client's per-request work (URL merging, cookies, auth and redirect hooks, a
    log line) and its request and response models were more than half of a delivery's HTTP CPU, and a
    delivery uses none of it. Timeouts go on each exchange (:func:`request_timeout`).
    """
    with _lock:
        _reset_if_forked()
        transport = _state.http
        if transport is None:
            transport = _state.http = VendorHTTP()
        return transport


def request_timeout(s: Settings) -> dict[str, float | None]:
    """HTTP_TIMEOUT for one exchange (connecting takes at most CONNECT_TIMEOUT_CAP of it), as httpcore wants it."""
    return httpx.Timeout(s.http_timeout, connect=min(s.http_timeout, CONNECT_TIMEOUT_CAP)).as_dict()


def redis_client() -> redis.Redis:
    """The process's Redis client for limiter state, breakers, the retry schedule and dead letters."""
    with _lock:
        _reset_if_forked()
        client = _state.redis
        if client is None:
            s = get_settings()
            # REDIS_URL may name Sentinels: the client then follows the master across failovers.
            client = s.redis_target().client(socket_connect_timeout=5, socket_timeout=10, health_check_interval=30)
            _state.redis = client
        return client


def reset() -> None:
    """Forget the clients (tests use it after changing the environment)."""
    with _lock:
        http, client = _state.http, _state.redis
        _state.http = _state.redis = None
        for obj in (http, client):
            if obj is not None:
                obj.close()
