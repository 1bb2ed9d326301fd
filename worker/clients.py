"""One Redis client and one pooled ``httpx.Client`` per process, made on first use.

Both are thread-safe, so every delivery thread of a worker shares them. After a
fork the child makes its own (connections must not be shared across processes).

Example::

    >>> from worker.clients import http_client
    >>> http_client().timeout.read  # doctest: +SKIP
    10.0
"""

from __future__ import annotations

import os
import threading

import httpx
import redis

from .settings import get_settings

#: Seconds to wait for a TCP connection to a vendor (the rest of HTTP_TIMEOUT is for the exchange).
CONNECT_TIMEOUT_CAP = 5.0
#: Idle keep-alive connections kept per process beyond the worker's concurrency.
SPARE_CONNECTIONS = 8

_lock = threading.Lock()
_state: dict[str, object] = {"pid": None}


def _reset_if_forked() -> None:
    if _state["pid"] != os.getpid():
        _state.clear()
        _state["pid"] = os.getpid()


def http_client() -> httpx.Client:
    """The process's HTTP client: explicit timeouts, no redirects, keep-alive pool."""
    with _lock:
        _reset_if_forked()
        client = _state.get("http")
        if client is None:
            s = get_settings()
            timeout = httpx.Timeout(s.http_timeout, connect=min(s.http_timeout, CONNECT_TIMEOUT_CAP))
            size = s.worker_concurrency + SPARE_CONNECTIONS
            limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
            client = httpx.Client(
                timeout=timeout,
                limits=limits,
                follow_redirects=False,
                headers={"User-Agent": "vendor-delivery-worker/0.1", "Accept": "application/json"},
            )
            _state["http"] = client
        return client


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
