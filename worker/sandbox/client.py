"""Small httpx client for the sandbox control API (``/_sandbox``).

Example::

    client = SandboxClient("http://127.0.0.1:8900")
    client.configure("loops", fail_next=[503], rate_limit=10)   # sliding window: at most 10 in any 1 s
    client.configure("loops", fail_next=[{"status": 503, "match": '"upgraded"'}])  # only the request naming it
    client.configure("loops", rate_limit_mode="fixed", rate_limit_shared=3, latency_ms=100, latency_jitter_ms=50)
    client.configure("convertloop", revoke_key=True)   # its 401 to every request, good credentials or not
    ...  # exercise code that talks to Loops
    sends = client.wait_for(2, vendor="loops")         # two 200s recorded
    client.wait_for(lambda r: r["path"] == "/events/send", vendor="loops")
    client.state("loops", "ada@example.com")  # {"properties": {}, "mailing_lists": {}, "events": [..], "writes": 2}
    client.state("loops")                      # {person key: state}; client.state(): {vendor: {person key: state}}
    client.reset()
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, overload

import httpx

__all__ = ["SandboxClient"]

# Timeout of each control API call, in seconds.
DEFAULT_HTTP_TIMEOUT = 10.0
# Delay between polls in `SandboxClient.wait_for`, in seconds.
POLL_INTERVAL = 0.02

Record = dict[str, Any]


class SandboxClient:
    """Client for a running sandbox at ``url`` (its root, e.g. ``Sandbox.url``)."""

    def __init__(self, url: str, timeout: float = DEFAULT_HTTP_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url + "/_sandbox", timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"sandbox {method} {path} -> {response.status_code}: {response.text}")
        return response.json()

    def health(self) -> bool:
        """True if the sandbox answers ``{"ok": true}``."""
        return bool(self._call("GET", "/health").get("ok"))

    def requests(
        self,
        vendor: str | None = None,
        since: int | None = None,
        status: int | None = None,
        limit: int | None = None,
    ) -> list[Record]:
        """Recorded vendor requests, oldest first (see the control API filters)."""
        filters = {"vendor": vendor, "since": since, "status": status, "limit": limit}
        params = {key: value for key, value in filters.items() if value is not None}
        return self._call("GET", "/requests", params=params)["requests"]

    def stats(self) -> dict[str, Any]:
        """``{"vendors": {name: {"received": n, "by_status": {"200": n}}}}``."""
        return self._call("GET", "/stats")

    @overload
    def state(self, vendor: None = None, person: str | None = None) -> dict[str, dict[str, Any]]: ...
    @overload
    def state(self, vendor: str, person: None = None) -> dict[str, Any]: ...
    @overload
    def state(self, vendor: str, person: str) -> dict[str, Any] | None: ...

    def state(self, vendor: str | None = None, person: str | None = None) -> Any:
        """Final state of persons, from the writes each vendor accepted, in arrival order.

        No vendor: ``{vendor: {person key: state}}`` (only ``person``'s entries if given).
        A vendor: that vendor's ``{person key: state}``.  A vendor and a person: that
        person's state, or None if the vendor accepted no write for them.
        """
        filters = {"vendor": vendor, "person": person}
        params = {key: value for key, value in filters.items() if value is not None}
        states: dict[str, dict[str, Any]] = self._call("GET", "/state", params=params)
        if vendor is None:
            return states
        return states[vendor] if person is None else states[vendor].get(person)

    def configure(self, vendor: str, **switches: Any) -> dict[str, Any]:
        """Set switches of ``vendor`` (or ``"*"`` for all); None clears a switch."""
        return self._call("POST", "/config", json={"vendor": vendor, **switches})

    def reset(self) -> None:
        """Clear records, stats, person state, idempotency keys, switches and rate-limit buckets."""
        self._call("POST", "/reset")

    def wait_for(
        self,
        predicate_or_count: int | Callable[[Record], bool],
        vendor: str | None = None,
        status: int | None = 200,
        timeout: float = 10.0,
        *,
        count: int = 1,
    ) -> list[Record]:
        """Poll until enough recorded requests match; returns the matches.

        ``predicate_or_count`` is either the number of requests to wait for, or a
        per-record predicate (then ``count`` matches are awaited, default 1).
        ``vendor``/``status`` filter first (``status=None``: any status).
        Raises TimeoutError describing what was seen instead.
        """
        if callable(predicate_or_count):
            predicate: Callable[[Record], bool] = predicate_or_count
        else:
            count, predicate = predicate_or_count, lambda record: True
        deadline = time.monotonic() + timeout
        while True:
            matches = [r for r in self.requests(vendor=vendor, status=status) if predicate(r)]
            if len(matches) >= count:
                return matches
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL)
        seen = self.requests(vendor=vendor)
        summary = ", ".join(f"{r['method']} {r['vendor']}{r['path']} -> {r['status']}" for r in seen[-10:])
        raise TimeoutError(
            f"waited {timeout}s for {count} request(s) (vendor={vendor!r}, status={status!r}"
            f"{', predicate' if callable(predicate_or_count) else ''}); {len(matches)} matched, "
            f"{len(seen)} recorded for that vendor; last: [{summary or 'none'}]"
        )
