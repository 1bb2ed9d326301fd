"""One Redis client and one vendor HTTP (keep-alive HTTP/1.1 connections, :mod:`worker.http11`) per process.

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
from collections.abc import Mapping
from json import dumps
from typing import Any, NamedTuple

import httpx
import redis

from . import http11
from .http11 import Reply
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


class SlotMissed(Exception):
    """A request not sent: it would have left later than its rate-limit slot allows (its thread got no CPU in
    time). Nothing was written; take another slot and send it then."""


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


class VendorHTTP:
    """Keep-alive connections to the vendors, reused exchange by exchange, per vendor host.

    Each exchange takes a :class:`~worker.http11.Connection` of its own for the vendor's host from a
    :class:`~worker.slots.Slots` pool, and gives it back (open, when the vendor keeps it) once the answer is
    read: as many connections exist per host as exchanges ran there at once (a thread's, or a greenlet's: the
    gevent pool runs each task in a new greenlet), and at most ``keep`` stay idle. The exchange itself is
    :mod:`worker.http11` (a request in one write, the answer read in full: a third of httpcore's CPU per
    exchange); URLs are parsed once each, by httpx, and every connection shares one TLS context: loading the
    CA certificates costs tens of milliseconds of CPU per context.
    """

    def __init__(self, keep: int = IDLE_TRANSPORTS) -> None:
        self._keep = keep
        self._hosts: dict[http11.Origin, Slots[http11.Connection]] = {}
        #: When the last exchange with each host ended (monotonic seconds).
        self._last: dict[http11.Origin, float] = {}
        self._lock = threading.Lock()
        # One TLS context for every connection, as httpx makes it (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), made
        # here: making one loads the CA bundle, ~60 ms of CPU under the GIL, which an exchange would otherwise pay
        # after its rate-limit slot.
        self._ssl: ssl.SSLContext = httpx.create_ssl_context()
        self._ssl.set_alpn_protocols(["http/1.1"])
        self._poll = http11.plain_poll()

    def _new_connection(self, origin: http11.Origin) -> http11.Connection:
        return http11.Connection(origin, self._ssl, KEEPALIVE_EXPIRY, self._poll)

    def _slots(self, target: _Target) -> Slots[http11.Connection]:
        slots = self._hosts.get(target.origin)
        if slots is None:
            with self._lock:
                slots = self._hosts.get(target.origin)
                if slots is None:
                    origin = target.origin
                    slots = self._hosts[origin] = Slots(lambda: self._new_connection(origin), _close, self._keep)
        return slots

    def exchange(self, method: str, url: str, headers: Mapping[str, str], json: Any,
                 timeout: Mapping[str, float | None], send_by: float | None = None) -> Reply:
        """Send ``json`` (compact UTF-8 JSON) with ``headers`` and read the answer in full.

        ``send_by``: the latest ``time.monotonic()`` at which the request may leave (its rate-limit slot's,
        :meth:`worker.limits.throttle.Throttle.wait`); checked with the request encoded and its connection in
        hand, just before the write: past it, nothing is sent and :class:`SlotMissed` is raised.

        Raises httpx's exceptions: :class:`httpx.TimeoutException`, :class:`httpx.NetworkError` and
        :class:`httpx.RemoteProtocolError` are worth another attempt; any other :class:`httpx.HTTPError` is
        a request that cannot be made.
        """
        target = _target(url)
        body = dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        data = http11.encode_request(method, target.path, target.netloc, headers, body)
        slots = self._slots(target)
        conn = slots.take()
        if send_by is not None and (late := time.monotonic() - send_by) > 0:
            slots.give(conn)
            raise SlotMissed(f"not sent: {late * 1000:.1f} ms past its rate-limit slot's last moment")
        try:
            reply = conn.request(data, timeout, head_only=method == "HEAD")
        finally:
            slots.give(conn)  # on a failure too: the failed connection closed itself, the next one connects anew
        self._last[target.origin] = time.monotonic()
        return reply

    def warm(self, url: str) -> bool:
        """An exchange with ``url``'s host ended less than half ``KEEPALIVE_EXPIRY`` ago: its connection, left
        open, is at hand for the next exchange there, which then need not connect first (the
        rate limiter's margin for it is the warm one). Asked when a rate-limit slot is reserved, for an
        exchange that comes later: a connection busy now is given back by then, so only the time counts (asking
        for an idle one now made ~5 % of requests at 50/s cold, each holding its place 0.3 s longer)."""
        try:
            origin = _target(url).origin
        except httpx.UnsupportedProtocol:  # the exchange says so, in its own words
            return False
        return time.monotonic() - self._last.get(origin, -math.inf) < KEEPALIVE_EXPIRY / 2

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


def _close(conn: http11.Connection) -> None:
    conn.close()


class _Target(NamedTuple):
    """A URL as an exchange needs it: where it connects, the Host header, and the request target."""

    origin: http11.Origin
    netloc: str
    path: str


@functools.lru_cache(maxsize=256)
def _target(url: str) -> _Target:
    """Parsed by httpx once per URL: a vendor's base URL and its few fixed paths. Raises
    :class:`httpx.UnsupportedProtocol` for a URL that is not http(s) (as an httpx client would)."""
    u = httpx.URL(url)
    if u.scheme not in ("http", "https"):
        raise httpx.UnsupportedProtocol(_unsupported(u.scheme))
    if not u.host:
        raise httpx.UnsupportedProtocol(f"Request URL {url!r} has no host.")
    port = u.port or (443 if u.scheme == "https" else 80)
    return _Target(http11.Origin(u.scheme, u.host, port), u.netloc.decode("ascii"), u.raw_path.decode("ascii"))


def _unsupported(scheme: str) -> str:
    """httpx's words for a URL it cannot send."""
    if not scheme:
        return "Request URL is missing an 'http://' or 'https://' protocol."
    return f"Request URL has an unsupported protocol '{scheme}://'."


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
    """HTTP_TIMEOUT for one exchange (connecting takes at most CONNECT_TIMEOUT_CAP of it), per phase."""
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
