"""One Redis client and one pooled HTTP transport (httpx) per process, made on first use.

Both are thread- and greenlet-safe, so every delivery thread (or greenlet) of a worker shares them. After a
fork the child makes its own (connections must not be shared across processes).

Example::

    >>> from worker.clients import request_timeout
    >>> request_timeout(get_settings())  # doctest: +SKIP
    {'connect': 5.0, 'read': 10.0, 'write': 10.0, 'pool': 10.0}
"""

from __future__ import annotations

import functools
import os
import ssl
import threading
from collections.abc import Callable, Iterator

import httpx
import redis

from .settings import Settings, get_settings
from .slots import Slots

#: Seconds to wait for a TCP connection to a vendor (the rest of HTTP_TIMEOUT is for the exchange).
CONNECT_TIMEOUT_CAP = 5.0
#: Sent with every vendor request.
USER_AGENT = "vendor-delivery-worker/0.1"
#: Keep-alive connections per transport (an exchange uses one at a time).
CONNECTIONS_PER_THREAD = 4
#: Transports per vendor host that stay open while idle (more run at once under load, and are closed after).
IDLE_TRANSPORTS = 256

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
    """Small keep-alive pools (httpx transports) reused exchange by exchange, per vendor host.

    httpcore's shared pool looks over all of its connections on every request, under a lock: with a pool
    sized for 32+ threads that scan cost more CPU than the rest of the exchange. So each exchange takes a
    transport of its own for the vendor's host from a :class:`~worker.slots.Slots` pool, and gives it back
    (with its open connection) once the response is closed. As many transports exist per host as exchanges
    ran there at once (a thread's, or a greenlet's: the gevent pool runs each task in a new greenlet, so a
    transport per thread would be one per task), and at most ``keep`` stay idle. They share one TLS context:
    loading the CA certificates costs tens of milliseconds of CPU per context.
    """

    def __init__(self, per_thread: int = CONNECTIONS_PER_THREAD, keep: int = IDLE_TRANSPORTS) -> None:
        self._limits = httpx.Limits(max_connections=per_thread, max_keepalive_connections=per_thread)
        self._keep = keep
        self._hosts: dict[tuple[str, str, int | None], Slots[httpx.BaseTransport]] = {}
        self._lock = threading.Lock()
        # One TLS context for every transport, as httpx makes it (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), made
        # here: making one loads the CA bundle, ~60 ms of CPU under the GIL, which an exchange would otherwise
        # pay after its rate-limit slot.
        self._ssl: ssl.SSLContext = httpx.create_ssl_context()

    def _new_transport(self) -> httpx.BaseTransport:
        return httpx.HTTPTransport(limits=self._limits, verify=self._ssl)

    def _slots(self, url: httpx.URL) -> Slots[httpx.BaseTransport]:
        host = (url.scheme, url.host, url.port)
        slots = self._hosts.get(host)
        if slots is None:
            with self._lock:
                slots = self._hosts.get(host)
                if slots is None:
                    slots = self._hosts[host] = Slots(self._new_transport, _close, self._keep)
        return slots

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        slots = self._slots(request.url)
        transport = slots.take()
        try:
            response = transport.handle_request(request)
        except BaseException:
            slots.give(transport)  # httpcore dropped the failed connection; the transport is fine
            raise
        if response.is_closed:  # read in full already (a transport that buffers): nothing holds the transport
            slots.give(transport)
        else:
            response.stream = _GiveBack(response.stream, functools.partial(slots.give, transport))
        return response

    def warm(self, url: str | httpx.URL) -> bool:
        """An idle transport for ``url``'s host is at hand, with the connection its last exchange left open:
        the next exchange there need not connect first (the rate limiter's margin for it is the warm one)."""
        u = httpx.URL(url)
        slots = self._hosts.get((u.scheme, u.host, u.port))
        return slots is not None and slots.idle() > 0

    def close_thread(self) -> None:
        """Nothing to close: a thread holds no transport between exchanges (kept for callers of old)."""

    def open_transports(self) -> int:
        """Transports (each a small connection pool) open now: idle and in use."""
        with self._lock:
            hosts = list(self._hosts.values())
        return sum(s.idle() + s.out() for s in hosts)

    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for slots in hosts:
            slots.close()


def _close(transport: httpx.BaseTransport) -> None:
    transport.close()


class _GiveBack(httpx.SyncByteStream):
    """A response's body; closing it also gives its transport back (once)."""

    def __init__(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream, give: Callable[[], None]) -> None:
        assert isinstance(stream, httpx.SyncByteStream), "a sync transport's response"
        self._stream = stream
        self._give: Callable[[], None] | None = give

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            give, self._give = self._give, None
            if give is not None:
                give()


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
