"""Diagnostic only: a worker started with ``--include tests.benchmarks.fasthttp`` sends with ``http.client``.

Replaces ``Pipeline._send`` (httpcore through :class:`worker.clients.VendorHTTP`) by one keep-alive
``http.client`` connection per thread, to measure what the HTTP client costs per delivery. Not for
production: no error mapping, stale-connection check or TLS context beyond what the sandbox needs.

Example (an ad-hoc drain; compare with the same drain without ``extra_args``)::

    >>> _drain(stack, 6000, noop=False, extra_args=("--include", "tests.benchmarks.fasthttp"))  # doctest: +SKIP
"""

from __future__ import annotations

import http.client
import json
import threading
from urllib.parse import urlsplit

from worker import clients
from worker.delivery.pipeline import _BASE_HEADERS, Pipeline

_local = threading.local()


def _connection(scheme: str, netloc: str, timeout: float) -> http.client.HTTPConnection:
    conns = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    conn = conns.get((scheme, netloc))
    if conn is None:
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = conns[(scheme, netloc)] = cls(netloc, timeout=timeout)
    return conn


def _send(self, vendor, request) -> clients.Reply:
    url = urlsplit(vendor.base_url(self.settings).rstrip("/") + request.path)
    headers = {**_BASE_HEADERS, **request.headers, **vendor.auth_headers(self.settings),
               "Content-Type": "application/json"}
    body = json.dumps(request.json, ensure_ascii=False, separators=(",", ":")).encode()
    for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
        conn = _connection(url.scheme, url.netloc, self.settings.http_timeout)
        try:
            conn.request(request.method, url.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return clients.Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                                 data.decode("utf-8", "replace"))
        except (http.client.HTTPException, OSError):
            conn.close()
            _local.conns.pop((url.scheme, url.netloc), None)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


Pipeline._send = _send  # type: ignore[method-assign]
