"""One Redis client and one pooled vendor HTTP (httpcore, httpx's transport layer) per process, made on first use.

Both are thread- and greenlet-safe, so every delivery thread (or greenlet) of a worker shares them. After a
fork the child makes its own (connections must not be shared across processes).

Example::

    >>> from worker.clients import request_timeout
    >>> request_timeout(get_settings())  # doctest: +SKIP
    {'connect': 5.0, 'read': 10.0, 'write': 10.0, 'pool': 10.0}
"""

from __future__ import annotations

import functools
import math
import os
import select
import ssl
import threading
import time
from collections.abc import Mapping
from json import dumps
from typing import Any, NamedTuple

import httpcore
import httpx
import redis

from .settings import Settings, get_settings
from .slots import Slots

#: Seconds to wait for a TCP connection to a vendor (the rest of HTTP_TIMEOUT is for the exchange).
CONNECT_TIMEOUT_CAP = 5.0
#: Sent with every vendor request.
USER_AGENT = "vendor-delivery-worker/0.1"
#: Keep-alive connections per pool (an exchange uses one at a time).
CONNECTIONS_PER_THREAD = 4
#: Pools per vendor host that stay open while idle (more run at once under load, and are closed after).
IDLE_TRANSPORTS = 256
#: Seconds an idle keep-alive connection is kept (httpx's default).
KEEPALIVE_EXPIRY = 5.0

#: The connection pool an exchange takes for one request (one per exchange at a time, see :class:`VendorHTTP`).
_Pool = httpcore.ConnectionPool

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


class VendorHTTP:
    """Keep-alive connections to the vendors, reused exchange by exchange, per vendor host.

    The exchange runs on httpcore, httpx's own transport layer, without httpx's request and response
    models: building an ``httpx.Request`` (URL parsing, header normalising) and reading an ``httpx.Response``
    cost about a third of a delivery's HTTP CPU, and a delivery needs none of it (its URLs are a vendor's
    base URL and a fixed path, parsed once). Failures are raised as httpx's exceptions.

    httpcore's pool looks over all of its connections on every request, under a lock: with one pool sized
    for 32+ threads that scan cost more CPU than the rest of the exchange. So each exchange takes a small
    pool of its own for the vendor's host from a :class:`~worker.slots.Slots` pool, and gives it back (with
    its open connection) once the answer is read. As many pools exist per host as exchanges ran there at
    once (a thread's, or a greenlet's: the gevent pool runs each task in a new greenlet), and at most
    ``keep`` stay idle. They share one TLS context: loading the CA certificates costs tens of milliseconds
    of CPU per context.
    """

    def __init__(self, per_thread: int = CONNECTIONS_PER_THREAD, keep: int = IDLE_TRANSPORTS) -> None:
        self._per_thread = per_thread
        self._keep = keep
        self._hosts: dict[tuple[bytes, bytes, int | None], Slots[_Pool]] = {}
        #: When the last exchange with each host ended (monotonic seconds).
        self._last: dict[tuple[bytes, bytes, int | None], float] = {}
        self._lock = threading.Lock()
        # One TLS context for every pool, as httpx makes it (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), made here:
        # making one loads the CA bundle, ~60 ms of CPU under the GIL, which an exchange would otherwise pay
        # after its rate-limit slot.
        self._ssl: ssl.SSLContext = httpx.create_ssl_context()

    def _new_pool(self) -> _Pool:
        return httpcore.ConnectionPool(ssl_context=self._ssl, max_connections=self._per_thread,
                                       max_keepalive_connections=self._per_thread, keepalive_expiry=KEEPALIVE_EXPIRY)

    def _slots(self, target: _Target) -> Slots[_Pool]:
        slots = self._hosts.get(target.origin)
        if slots is None:
            with self._lock:
                slots = self._hosts.get(target.origin)
                if slots is None:
                    slots = self._hosts[target.origin] = Slots(self._new_pool, _close, self._keep)
        return slots

    def exchange(self, method: str, url: str, headers: Mapping[str, str], json: Any,
                 timeout: Mapping[str, float | None]) -> Reply:
        """Send ``json`` (encoded as httpx encodes it) with ``headers`` and read the answer in full.

        Raises httpx's exceptions: :class:`httpx.TimeoutException`, :class:`httpx.NetworkError` and
        :class:`httpx.RemoteProtocolError` are worth another attempt; any other :class:`httpx.HTTPError` is
        a request that cannot be made.
        """
        target = _target(url)
        body = dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        raw = [(b"Host", target.netloc), *((k.encode("ascii"), v.encode("ascii")) for k, v in headers.items()),
               (b"Content-Type", b"application/json"), (b"Content-Length", str(len(body)).encode())]
        request = httpcore.Request(method.encode("ascii"), target.url, headers=raw, content=body,
                                   extensions={"timeout": timeout})
        slots = self._slots(target)
        pool = slots.take()
        try:
            response = pool.handle_request(request)
            try:
                content = response.read()
            finally:
                response.close()
        except _CORE_ERRORS as exc:
            raise _as_httpx(exc) from exc
        finally:
            slots.give(pool)  # on a failure too: httpcore dropped the failed connection, the pool is fine
        self._last[target.origin] = time.monotonic()
        return Reply(response.status,
                     {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers},
                     content.decode("utf-8", errors="replace"))

    def warm(self, url: str) -> bool:
        """An exchange with ``url``'s host ended less than half ``KEEPALIVE_EXPIRY`` ago: its pool, with the
        connection left open, is at hand for the next exchange there, which then need not connect first (the
        rate limiter's margin for it is the warm one). Asked when a rate-limit slot is reserved, for an
        exchange that comes later: a pool busy now is given back by then, so only the time counts (asking
        for an idle pool now made ~5 % of requests at 50/s cold, each holding its place 0.3 s longer)."""
        return time.monotonic() - self._last.get(_target(url).origin, -math.inf) < KEEPALIVE_EXPIRY / 2

    def open_transports(self) -> int:
        """Pools (each a few keep-alive connections) open now: idle and in use."""
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


def _close(pool: _Pool) -> None:
    pool.close()


class _Target(NamedTuple):
    """A URL as an exchange needs it: httpcore's URL, the Host header, and the origin its pools are kept by."""

    url: httpcore.URL
    netloc: bytes
    origin: tuple[bytes, bytes, int | None]


@functools.lru_cache(maxsize=256)
def _target(url: str) -> _Target:
    """Parsed by httpx once per URL: a vendor's base URL and its few fixed paths."""
    u = httpx.URL(url)  # a missing or unsupported scheme is httpcore's to refuse, with httpx's own words
    scheme = u.scheme.encode("ascii")
    return _Target(httpcore.URL(scheme=scheme, host=u.raw_host, port=u.port, target=u.raw_path), u.netloc,
                   (scheme, u.raw_host, u.port))


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


def readability_check_without_a_switch() -> bool:
    """On gevent: make httpcore's check that an idle keep-alive connection is still open a plain ``poll`` with a
    0 s timeout, which never blocks, instead of gevent's cooperative one; True when it did.

    gevent's ``poll`` waits even a 0 s timeout in its hub, so the check switched to every other ready greenlet.
    It runs when a delivery takes its connection: after the rate limiter admitted its slot, before the request
    is written. So the request could leave tens of milliseconds after its slot (measured at the sandbox: 35 ms
    late, a 429 from a strict 5/s window, once in ~20 runs of the gevent rate-limit test), later than the
    limiter's margin allows. The standard library's ``poll`` (``gevent.monkey.get_original``) answers at once.
    """
    try:
        from gevent import monkey
    except ImportError:
        return False
    if not monkey.is_module_patched("select"):
        return False
    from httpcore._backends import sync  # the name its streams call (httpcore 1.x)

    if not hasattr(sync, "is_socket_readable"):
        return False
    poll = monkey.get_original("select", "poll")

    def is_socket_readable(sock: Any) -> bool:
        fd = None if sock is None else sock.fileno()
        if fd is None or fd < 0:
            return True  # no socket: as httpcore, readable (its next read returns the end)
        p = poll()
        p.register(fd, select.POLLIN)
        return bool(p.poll(0))

    sync.is_socket_readable = is_socket_readable
    return True


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
