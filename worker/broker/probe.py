"""One probe of a vendor whose circuit breaker is open: one real delivery, outside Celery's consumer.

The probe takes ONE message (the earliest waiting retry, else the next on the
vendor's queue) and records it as held, as kombu does, so it is redelivered if
this process dies. It delivers it through the same
:func:`~worker.broker.attempt.attempt` as the task, then acknowledges it (delivered, or
dead-lettered: the vendor answered), or finds it already on the retry schedule
(failed again: the breaker spaces the next probe further), or puts it back
untouched (no token, or no answer to judge by; or the vendor still refuses the
credentials, which also puts the next probe off by the pause's spacing).

Example::

    >>> run_probe("loops", RetrySchedule.default(), Pipeline.default().breaker)   # doctest: +SKIP
    'delivered'
"""

from __future__ import annotations

import json
import logging

import redis

from ..delivery.pipeline import (
    Delivered,
    Merged,
    Parked,
    RetryLater,
    VendorAuthFailed,
    VendorDown,
    Yielded,
)
from ..envelope import decode_body
from ..errors import DeadLettered
from ..keys import HEADER
from ..limits.throttle import Throttled
from ..redisconf import REDIS_FULL
from ..retries.attempts import RetryState
from ..retries.breaker import Breaker
from ..retries.schedule import RetrySchedule
from .attempt import attempt
from .transport import FULLNESS, quarantine

log = logging.getLogger(__name__)


def run_probe(vendor: str, schedule: RetrySchedule, breaker: Breaker) -> str:
    """Probe ``vendor`` once (the caller holds the probe lease); returns what became of the probe."""
    failed = False
    try:
        raw = schedule.claim_one(vendor)
    except redis.OutOfMemoryError as exc:  # refused whole: nothing taken
        FULLNESS.seen(exc)
        _probe_done(breaker, vendor, failed=False)
        return REDIS_FULL
    if raw is None:
        _probe_done(breaker, vendor, failed=False)
        return "nothing to probe with"
    outcome = "given back"
    envelope = json.loads(raw)  # claim_one took only a JSON message with a delivery tag
    tag = envelope["properties"]["delivery_tag"]
    try:
        headers = envelope["headers"]
        try:
            (name, event), _, _ = decode_body(envelope)  # either format: compact, or base64 as written before
        except (ValueError, TypeError, KeyError) as exc:
            schedule.ack(tag)
            quarantine(vendor, raw, f"probe could not read the message: {type(exc).__name__}: {exc}")
            return "malformed"
        try:
            result = attempt(name, event, RetryState.from_headers(headers), headers.get("id") or "",
                             tag, int(headers.get("retries") or 0), probe=True, person=headers.get(HEADER))
        except DeadLettered:
            schedule.ack(tag)
            outcome = "dead-lettered"
        except VendorAuthFailed as refused:
            schedule.give_back(vendor, raw, tag)
            failed = True
            outcome = f"the credentials are still refused ({refused.status}; fix {refused.credential_env})"
        except (Throttled, VendorDown):
            schedule.give_back(vendor, raw, tag)
        else:
            if isinstance(result, (Delivered, Merged)):
                schedule.ack(tag)
                outcome = "delivered"
            elif isinstance(result, Parked):  # parked behind the person's turn (acknowledged): nothing to judge by
                outcome = "waiting behind an earlier call of the same person"
            elif isinstance(result, Yielded):
                schedule.give_back(vendor, raw, tag)
            else:  # on the retry schedule already, this message acknowledged
                assert isinstance(result, RetryLater)
                failed = result.status != 429
                outcome = f"failed again ({result.error})" if failed else "rate limited"
    except redis.OutOfMemoryError as exc:  # its outcome could not be recorded: delivered again later
        FULLNESS.seen(exc)
        outcome = f"{REDIS_FULL}, not recorded"
        try:
            schedule.give_back(vendor, raw, tag)  # one MULTI: refused whole while Redis is full
        except redis.RedisError:  # held under its tag: delivered again after the visibility timeout
            outcome += "; the message stays held until the visibility timeout"
    except Exception:
        log.exception("%s: probe failed unexpectedly; its message goes back on the queue", vendor)
        try:
            schedule.give_back(vendor, raw, tag)
        except Exception:  # Redis away: the message is held under its tag and comes back by itself
            log.exception("%s: could not give the probe's message back", vendor)
    finally:
        _probe_done(breaker, vendor, failed)
    log.warning("%s: circuit breaker probe: %s", vendor, outcome)
    return outcome


def _probe_done(breaker: Breaker, vendor: str, failed: bool) -> None:
    """Tell the breaker; if Redis does not take it (full, away), the probe lease simply expires."""
    try:
        breaker.probe_done(vendor, failed)
    except redis.RedisError as exc:
        log.warning("%s: could not record the probe's end (its lease expires by itself): %s", vendor, exc)
