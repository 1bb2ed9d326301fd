"""What ``python -m worker status`` shows and the metrics exporter's gauges read: one read model of the system.

:func:`vendor_status` reads, per vendor, the queue, the messages workers hold, the retry schedule, the circuit
breaker, the limiter's effective rate, dead-letter counts and people held in order; plus the local spool and
Redis' memory. The CLI prints it (:mod:`worker.ops.cli`), the exporter turns it into gauges
(:mod:`worker.ops.export`); neither reads Redis for these on its own.

Example::

    >>> vendor_status()["vendors"]["loops"]["queued"]   # doctest: +SKIP
    0
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import redis

from .. import clients
from ..delivery.deadletters import DeadLetterStore
from ..delivery.ordering import PersonLog
from ..events import utc_iso
from ..keys import UNACKED
from ..limits.ratelimit import limiter_for
from ..producer.spool import Spool
from ..redisconf import memory
from ..retries.breaker import Breaker
from ..retries.schedule import RetrySchedule
from ..settings import get_settings
from ..vendors import VENDORS


def vendor_status() -> dict:
    """Everything ``status`` shows, as one JSON-able dict."""
    s = get_settings()
    r = clients.redis_client()
    schedule = RetrySchedule(r, s.key_prefix)
    breaker = Breaker(r, s.key_prefix, s.breaker_threshold, s.breaker_probe_max,
                      auth_threshold=s.auth_failure_threshold, auth_interval=s.auth_probe_interval)
    held: Counter[str] = Counter()
    for raw in r.hvals(UNACKED):
        try:
            held[json.loads(raw)[2]] += 1
        except (ValueError, IndexError, TypeError):
            held["?"] += 1
    dead = DeadLetterStore.default().counts()  # kept by vendor and reason: one round trip, however many
    out: dict = {"vendors": {}}
    for name, vendor in VENDORS.items():
        waiting = schedule.waiting(name)
        b = breaker.poll(name)
        configured = vendor.rate_limit(s)
        order = PersonLog(r, s.key_prefix, name)
        out["vendors"][name] = {
            "enabled": vendor.enabled(s),
            "queued": r.llen(name),
            "in_flight": held.get(name, 0),
            "retries_waiting": waiting.count,
            "next_retry_in": None if waiting.next_due_in is None else round(waiting.next_due_in, 1),
            "breaker": b.state if breaker.enabled else "off",
            "breaker_since": None if b.since is None else utc_iso(b.since),
            "failures_in_a_row": b.failures,
            "auth_failed": b.auth_failed,
            "auth_failures_in_a_row": b.auth_failures,
            "credential_env": vendor.credential_env,
            "rate_limit": configured or None,
            "effective_rate": _effective_rate(r, s, name, configured),
            "dead_letters": dict(sorted(dead.get(name, {}).items())),
            # Calls still in some person's order (queued, in flight, waiting to retry or parked), and people
            # with calls parked behind an earlier call of theirs (delivering, or waiting to retry).
            "ordered_pending": order.pending(),
            "people_held": order.held_people(),
        }
    spool = Spool(s.spool_dir, s.spool_max_bytes)
    out["spool"] = {"dir": s.spool_dir, "enabled": s.spool_enabled, "events": spool.pending(), "bytes": spool.size()}
    out["redis"] = _redis_status(r)
    return out


def _redis_status(client: redis.Redis) -> dict[str, Any]:
    """Redis' memory as ``status`` shows it: used and max bytes (0: no maxmemory), policy, FULL or not."""
    try:
        m = memory(client)
    except redis.ResponseError as exc:  # INFO refused (a managed Redis may rename or forbid it)
        return {"used_memory": None, "maxmemory": None, "maxmemory_policy": None, "full": None,
                "error": f"INFO memory refused: {exc}"}
    return {"used_memory": m.used, "maxmemory": m.max, "maxmemory_policy": m.policy, "full": m.full,
            "used_share": None if m.share is None else round(m.share, 4)}


def _effective_rate(client, s, vendor: str, configured: float) -> float | None:
    """The rate the limiter currently allows (the configured one unless it adapts)."""
    limiter = limiter_for(client, f"{s.key_prefix}:ratelimit:{vendor}", configured)
    rate = getattr(limiter, "effective_rate", None)
    value = rate() if callable(rate) else None
    return round(value, 2) if value is not None else (configured or None)
