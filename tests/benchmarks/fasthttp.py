"""Diagnostic only: a worker started with ``--include tests.benchmarks.fasthttp`` sends with ``http.client``.

Replaces ``Pipeline._send`` (httpx) by one keep-alive ``http.client`` connection per
thread, to measure what the HTTP client costs per delivery. Not for production: no
redirect, proxy or error mapping beyond what the sandbox needs.
"""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from worker.delivery.pipeline import Pipeline

_local = threading.local()


@dataclass
class _Response:
    status_code: int
    headers: http.client.HTTPMessage
    text: str


def _connection(scheme: str, netloc: str, timeout: float) -> http.client.HTTPConnection:
    conns = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    conn = conns.get((scheme, netloc))
    if conn is None:
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = conns[(scheme, netloc)] = cls(netloc, timeout=timeout)
    return conn


def _send(self, vendor, request):
    url = urlsplit(vendor.base_url(self.settings).rstrip("/") + request.path)
    headers = {**request.headers, **vendor.auth_headers(self.settings), "Content-Type": "application/json",
               "User-Agent": "vendor-delivery-worker/0.1", "Accept": "application/json"}
    body = json.dumps(request.json, separators=(",", ":")).encode()
    for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
        conn = _connection(url.scheme, url.netloc, self.settings.http_timeout)
        try:
            conn.request(request.method, url.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return _Response(resp.status, resp.headers, data.decode("utf-8", "replace"))
        except (http.client.HTTPException, OSError):
            conn.close()
            _local.conns.pop((url.scheme, url.netloc), None)
            if attempt == 2:
                raise


Pipeline._send = _send
