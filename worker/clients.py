"""One Redis client and one pooled HTTP transport (httpx) per process, made on first use.

Both are thread-safe, so every delivery thread of a worker shares them. After a
fork the child makes its own (connections must not be shared across processes).

Example::

    >>> from worker.clients import request_timeout
    >>> request_timeout(get_settings())  # doctest: +SKIP
    {'connect': 5.0, 'read': 10.0, 'write': 10.0, 'pool': 10.0}
"""

from __future__ import annotations

import os
import threading

import httpx
import redis

from .settings import Settings, get_settings

#: Seconds to wait for a TCP connection to a vendor (the rest of HTTP_TIMEOUT is for the exchange).
CONNECT_TIMEOUT_CAP = 5.0
#: Sent with every vendor request.
USER_AGENT = "vendor-delivery-worker/0.1"
#: Keep-alive connections per delivery thread: one per vendor host, and a spare.
CONNECTIONS_PER_THREAD = 4

_lock = threading.Lock()


class _Clients:
    """This process's clients, made on first use; ``pid`` is the process they belong to."""

    pid: int | None = None
    http: PerThreadTransport | None = None
    redis: redis.Redis | None = None


_state = _Clients()


def _reset_if_forked() -> None:
    if _state.pid != os.getpid():
        _state.http = _state.redis = None
        _state.pid = os.getpid()


class PerThreadTransport(httpx.BaseTransport):
    """One small keep-alive pool per delivery thread (a connection per vendor host), made on first use.

    httpcore's shared pool looks over all of its connections on every request, under a lock:
    with a pool sized for 32+ threads that scan cost more CPU than the rest of the exchange.
    """

    def __init__(self, per_thread: int = CONNECTIONS_PER_THREAD) -> None:
        self._limits = httpx.Limits(max_connections=per_thread, max_keepalive_connections=per_thread)
        # One TLS context for every thread's pool, as httpx makes it (certifi, or SSL_CERT_FILE/SSL_CERT_DIR):
        # making one loads the CA bundle, ~60 ms of CPU under the GIL, which a thread's first request would
        # otherwise pay after its rate-limit slot (32 threads starting at once: ~2 s late at the vendor).
        self._tls = httpx.create_ssl_context()
        self._local = threading.local()
        self._all: list[httpx.HTTPTransport] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        transport = getattr(self._local, "transport", None)
        if transport is None:
            transport = self._local.transport = httpx.HTTPTransport(verify=self._tls, limits=self._limits)
            with self._lock:
                self._all.append(transport)
        return transport.handle_request(request)

    def close_thread(self) -> None:
        """Close the calling thread's connections (a thread that ends, e.g. a breaker probe's)."""
        transport = getattr(self._local, "transport", None)
        if transport is None:
            return
        self._local.transport = None
        with self._lock:
            self._all = [t for t in self._all if t is not transport]
        transport.close()

    def open_transports(self) -> int:
        """Threads' connection pools open now."""
        with self._lock:
            return len(self._all)

    def close(self) -> None:
        with self._lock:
            transports, self._all = self._all, []
        for transport in transports:
            transport.close()


def http_client() -> PerThreadTransport:
    """The process's HTTP transport: keep-alive connections, no retries, no redirects, no cookies.

    httpx's transport layer rather than ``httpx.Client``: the client's per-request work (URL
    merging, cookies, auth and redirect hooks, a log line) was a third of a delivery's HTTP cost,
    and a delivery uses none of it. Timeouts go on each request (:func:`request_timeout`).
    """
    with _lock:
        _reset_if_forked()
        transport = _state.http
        if transport is None:
            transport = _state.http = PerThreadTransport()
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
