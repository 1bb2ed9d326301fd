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
#: Idle keep-alive connections kept per process beyond the worker's concurrency.
SPARE_CONNECTIONS = 8

_lock = threading.Lock()
_state: dict[str, object] = {"pid": None}


def _reset_if_forked() -> None:
    if _state["pid"] != os.getpid():
        _state.clear()
        _state["pid"] = os.getpid()


def http_client() -> httpx.HTTPTransport:
    """The process's HTTP transport: a keep-alive pool, no retries, no redirects, no cookies.

    httpx's transport layer rather than ``httpx.Client``: the client's per-request work (URL
    merging, cookies, auth and redirect hooks, a log line) was a third of a delivery's HTTP cost,
    and a delivery uses none of it. Timeouts go on each request (:func:`request_timeout`).
    """
    with _lock:
        _reset_if_forked()
        transport = _state.get("http")
        if transport is None:
            size = get_settings().worker_concurrency + SPARE_CONNECTIONS
            transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=size, max_keepalive_connections=size))
            _state["http"] = transport
        return transport


def request_timeout(s: Settings) -> dict[str, float]:
    """HTTP_TIMEOUT for one exchange (connecting takes at most CONNECT_TIMEOUT_CAP of it), as httpcore wants it."""
    return httpx.Timeout(s.http_timeout, connect=min(s.http_timeout, CONNECT_TIMEOUT_CAP)).as_dict()


def redis_client() -> redis.Redis:
    """The process's Redis client for limiter state and dead letters."""
    with _lock:
        _reset_if_forked()
        client = _state.get("redis")
        if client is None:
            s = get_settings()
            client = redis.Redis.from_url(
                s.redis_url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30
            )
            _state["redis"] = client
        return client


def reset() -> None:
    """Forget the clients (tests use it after changing the environment)."""
    with _lock:
        for key in ("http", "redis"):
            obj = _state.pop(key, None)
            if obj is not None:
                obj.close()
