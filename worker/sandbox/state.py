"""Sandbox state: recorded requests and per-vendor switches, behind one lock.

Switches (per vendor, see `VendorConfig`): ``latency_ms``, ``rate_limit``
(token bucket), ``retry_after``/``retry_after_format``, ``fail_next`` (FIFO of
injected failures) and ``fail_all`` (outage).

Example::

    state = SandboxState(["loops"])
    state.configure("loops", {"fail_next": [503]})
    record = state.begin("loops", "POST", "/events/send", "", {}, b"{}", True, None)
    state.take_failure("loops")      # -> Failure(status=503, ...)
    state.finish(record, 503)
    state.requests(status=503)       # -> [{"seq": 1, "vendor": "loops", ...}]
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "MAX_RECORDS",
    "REDACTED_HEADERS",
    "Failure",
    "SandboxState",
    "TokenBucket",
    "VendorConfig",
    "format_retry_after",
]

# Oldest recorded requests are dropped beyond this many.
MAX_RECORDS = 200_000
# Retry-After (seconds) sent with 429s when the vendor config does not say.
DEFAULT_RETRY_AFTER = 1
# Header names whose values are replaced by REDACTED in records.
REDACTED_HEADERS = frozenset({"authorization", "x-conveyour-appkey", "x-conveyour-token"})
# Replacement for secret header values.
REDACTED = "<redacted>"
# Accepted values of the ``retry_after_format`` switch.
RETRY_AFTER_FORMATS = ("seconds", "http-date")


def format_retry_after(value: int | float | str, fmt: str = "seconds") -> str:
    """Render a Retry-After header value.

    Strings are sent verbatim; numbers are seconds, rendered as an integer or,
    with ``fmt="http-date"``, as the HTTP date that many seconds from now.

    >>> format_retry_after(2)
    '2'
    """
    if isinstance(value, str):
        return value
    if fmt == "http-date":
        when = datetime.now(timezone.utc) + timedelta(seconds=value)
        return format_datetime(when, usegmt=True)
    return str(math.ceil(value))


class TokenBucket:
    """Token bucket: ``capacity = max(rate, 1)`` tokens, refilled at ``rate``/s.

    Not thread-safe by itself; `SandboxState` calls it under its lock.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self) -> bool:
        """Consume one token if available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True)
class Failure:
    """An injected failure to answer instead of the normal response."""

    status: int
    retry_after: str | None = None
    body: Any = None


def _check_status(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValueError(f"{name} must be an HTTP status code (100-599), got {value!r}")
    return value


def _check_number(value: object, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _check_retry_after(value: object, name: str) -> int | float | str:
    if isinstance(value, str):
        return value
    _check_number(value, name)
    return value  # type: ignore[return-value]


def _check_fail_entry(entry: object) -> int | dict[str, Any]:
    if isinstance(entry, dict):
        unknown = set(entry) - {"status", "retry_after", "body"}
        if unknown:
            raise ValueError(f"unknown fail_next keys: {sorted(unknown)}")
        _check_status(entry.get("status"), "fail_next[].status")
        if entry.get("retry_after") is not None:
            _check_retry_after(entry["retry_after"], "fail_next[].retry_after")
        return dict(entry)
    return _check_status(entry, "fail_next entry")


@dataclass
class VendorConfig:
    """Switches of one vendor.  `update` validates and applies a partial dict."""

    latency_ms: float = 0.0
    rate_limit: float | None = None
    retry_after: int | float | str = DEFAULT_RETRY_AFTER
    retry_after_format: str = "seconds"
    fail_next: deque[int | dict[str, Any]] = field(default_factory=deque)
    fail_all: int | None = None
    fail_all_retry_after: int | float | str | None = None

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply ``changes`` (null resets a switch); raises ValueError, applying nothing."""
        new = VendorConfig(**{**self.__dict__, "fail_next": deque(self.fail_next)})
        defaults = VendorConfig()
        for key, value in changes.items():
            if key not in defaults.__dict__:
                raise ValueError(f"unknown switch {key!r}; known: {sorted(defaults.__dict__)}")
            if value is None:
                setattr(new, key, getattr(defaults, key))
            elif key == "latency_ms":
                new.latency_ms = _check_number(value, key)
            elif key == "rate_limit":
                new.rate_limit = _check_number(value, key, positive=True)
            elif key in ("retry_after", "fail_all_retry_after"):
                setattr(new, key, _check_retry_after(value, key))
            elif key == "retry_after_format":
                if value not in RETRY_AFTER_FORMATS:
                    raise ValueError(f"retry_after_format must be one of {RETRY_AFTER_FORMATS}")
                new.retry_after_format = value
            elif key == "fail_next":
                entries = value if isinstance(value, list) else [value]
                new.fail_next = deque(_check_fail_entry(entry) for entry in entries)
            elif key == "fail_all":
                new.fail_all = _check_status(value, key)
        self.__dict__.update(new.__dict__)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "fail_next": list(self.fail_next)}


class SandboxState:
    """All mutable sandbox state, guarded by a single lock."""

    def __init__(self, vendors: Iterable[str], max_records: int = MAX_RECORDS) -> None:
        self.vendors = tuple(vendors)
        self._lock = threading.Lock()
        self._records: deque[dict[str, Any]] = deque(maxlen=max_records)
        self._seq = 0
        self._configs: dict[str, VendorConfig] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._idempotency: dict[str, dict[str, bool]] = {}
        self._received: dict[str, int] = {}
        self._by_status: dict[str, dict[str, int]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget records, stats, idempotency keys, switches and rate-limit buckets."""
        with self._lock:
            self._records.clear()
            self._seq = 0
            self._configs = {v: VendorConfig() for v in self.vendors}
            self._buckets = {}
            self._idempotency = {v: {} for v in self.vendors}
            self._received = {v: 0 for v in self.vendors}
            self._by_status = {v: {} for v in self.vendors}

    # -- configuration ----------------------------------------------------

    def config(self, vendor: str) -> dict[str, Any]:
        with self._lock:
            return self._configs[vendor].as_dict()

    def configure(self, vendor: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Apply switches to one vendor; returns its full config.  Raises ValueError/KeyError."""
        with self._lock:
            cfg = self._configs[vendor]
            cfg.update(changes)
            if "rate_limit" in changes:
                self._buckets.pop(vendor, None)
            return cfg.as_dict()

    # -- request lifecycle ------------------------------------------------

    def begin(
        self,
        vendor: str,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        auth_ok: bool,
        idempotency_key: str | None,
    ) -> dict[str, Any]:
        """Record an incoming vendor request (status None until `finish`)."""
        record: dict[str, Any] = {
            "seq": 0,
            "vendor": vendor,
            "method": method,
            "path": path,
            "query": query,
            "headers": {k: (REDACTED if k in REDACTED_HEADERS else v) for k, v in headers.items()},
            "auth_ok": auth_ok,
            "body": _decode_body(body),
            "status": None,
            "ts": time.time(),
            "idempotency_key": idempotency_key,
        }
        with self._lock:
            self._seq += 1
            record["seq"] = self._seq
            self._records.append(record)
            self._received[vendor] += 1
        return record

    def latency(self, vendor: str) -> float:
        """Configured latency of ``vendor`` in seconds."""
        with self._lock:
            return self._configs[vendor].latency_ms / 1000.0

    def take_failure(self, vendor: str) -> Failure | None:
        """The outage (`fail_all`) or next queued `fail_next` failure, if any."""
        with self._lock:
            cfg = self._configs[vendor]
            if cfg.fail_all is not None:
                retry = cfg.fail_all_retry_after
                return Failure(cfg.fail_all, _render(retry, cfg))
            if not cfg.fail_next:
                return None
            entry = cfg.fail_next.popleft()
            if isinstance(entry, int):
                return Failure(entry)
            return Failure(entry["status"], _render(entry.get("retry_after"), cfg), entry.get("body"))

    def take_token(self, vendor: str) -> str | None:
        """None if the request may proceed, else the Retry-After value for a 429."""
        with self._lock:
            cfg = self._configs[vendor]
            if cfg.rate_limit is None:
                return None
            bucket = self._buckets.get(vendor)
            if bucket is None:
                bucket = self._buckets[vendor] = TokenBucket(cfg.rate_limit)
            if bucket.take():
                return None
            return format_retry_after(cfg.retry_after, cfg.retry_after_format)

    def reserve_idempotency_key(self, vendor: str, key: str) -> bool:
        """Reserve ``key``; False if it was used successfully or is in flight."""
        with self._lock:
            keys = self._idempotency[vendor]
            if key in keys:
                return False
            keys[key] = False
            return True

    def settle_idempotency_key(self, vendor: str, key: str, succeeded: bool) -> None:
        """Keep a reserved key if the request succeeded, else release it."""
        with self._lock:
            keys = self._idempotency[vendor]
            if succeeded:
                keys[key] = True
            else:
                keys.pop(key, None)

    def finish(self, record: dict[str, Any], status: int) -> None:
        """Store the status the sandbox answered for ``record``."""
        with self._lock:
            record["status"] = status
            counts = self._by_status[record["vendor"]]
            counts[str(status)] = counts.get(str(status), 0) + 1

    # -- inspection -------------------------------------------------------

    def requests(
        self,
        vendor: str | None = None,
        since: int | None = None,
        status: int | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Recorded requests, oldest first, filtered; ``limit`` keeps the first N."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for record in self._records:
                if since is not None and record["seq"] <= since:
                    continue
                if vendor is not None and record["vendor"] != vendor:
                    continue
                if status is not None and record["status"] != status:
                    continue
                out.append(dict(record))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "vendors": {
                    v: {"received": self._received[v], "by_status": dict(self._by_status[v])}
                    for v in self.vendors
                }
            }


def _render(value: int | float | str | None, cfg: VendorConfig) -> str | None:
    return None if value is None else format_retry_after(value, cfg.retry_after_format)


def _decode_body(body: bytes) -> Any:
    """Parsed JSON, else the raw text (None for an empty body)."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
