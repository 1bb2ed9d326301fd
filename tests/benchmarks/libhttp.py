"""Diagnostic only: a worker started with ``--include tests.benchmarks.libhttp`` sends with httpcore, the library.

Replaces :meth:`worker.clients.VendorHTTP.exchange` (the worker's own HTTP/1.1, :mod:`worker.http11`) by one
``httpcore.ConnectionPool`` per process (httpx's transport layer, with its own keep-alive pool and h11): the
fastest well-kept library path, to measure what the hand-written exchange saves per delivery.

Example (an ad-hoc drain; compare with the same drain without ``extra_args``)::

    >>> _drain(stack, 6000, noop=False, extra_args=("--include", "tests.benchmarks.libhttp"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

import httpcore

from worker import clients

_lock = threading.Lock()
_pool: list[httpcore.ConnectionPool] = []


def _connections() -> httpcore.ConnectionPool:
    if not _pool:
        with _lock:
            if not _pool:
                _pool.append(httpcore.ConnectionPool(max_connections=512, max_keepalive_connections=256,
                                                     keepalive_expiry=clients.KEEPALIVE_EXPIRY))
    return _pool[0]


def exchange(self: clients.VendorHTTP, method: str, url: str, headers: Mapping[str, str], json_: Any,
             timeout: Mapping[str, float | None], send_by: float | None = None) -> clients.Reply:
    body = json.dumps(json_, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    response = _connections().request(method, url, headers={**headers, "Content-Type": "application/json"},
                                      content=body, extensions={"timeout": dict(timeout)})
    return clients.Reply(response.status, {k.decode("latin-1").lower(): v.decode("latin-1")
                                           for k, v in response.headers}, response.content.decode("utf-8", "replace"))


clients.VendorHTTP.exchange = exchange  # type: ignore[method-assign,assignment]
