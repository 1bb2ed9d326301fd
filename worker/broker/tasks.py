"""The one Celery task: deliver an event to a vendor. Thin on purpose.

Task name ``worker.deliver``, arguments ``(vendor, event)`` — the vendor's
name and the event's JSON; never a credential. It is routed to the queue named
after the vendor. The work is :meth:`worker.delivery.pipeline.Pipeline.deliver`; this
module only maps its results onto Celery:

- delivered: the task succeeds;
- retry: the next attempt's message goes on the vendor's retry schedule in
  Redis and this one is acknowledged, in one script
  (:class:`~worker.retries.schedule.RetrySchedule`); the task then raises
  Celery's ``Retry`` without publishing anything, so Flower shows RETRY with
  the vendor's answer, and the new message keeps the task id;
- dead letter: the task ends with :class:`~worker.errors.DeadLettered`
  (Flower: FAILURE);
- a throttled vendor, or one whose circuit breaker is open: the message goes
  back on its queue, no attempt counted, and the worker stops taking that
  queue for a moment (or, for an open breaker, until it closes);
- Redis full (maxmemory): an outcome that cannot be recorded (retry, dead
  letter) is not acknowledged either: :class:`RedisFull` rejects the message
  with requeue, which our transport (``worker/broker/transport.py``) leaves held in
  Redis until Redis has room, then puts back on its queue.

Example::

    >>> deliver.delay("loops", {"id": "e1", "operation": "track", ...})   # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.exceptions import Reject, Retry

from ..delivery.pipeline import Delivered, Merged, Parked, RetryableError, VendorDown, Yielded
from ..envelope import DELIVER_TASK
from ..errors import DeadLettered
from ..keys import HEADER
from ..limits import throttle
from ..limits.throttle import Throttled
from ..redisconf import REDIS_FULL
from ..retries.attempts import RetryState
from . import gate, transport
from .app import app
from .attempt import attempt, unexpected

log = logging.getLogger(__name__)

# A take brings one message of a vendor's queue at a time while its rate limit binds.
transport.add_room(throttle.room)


def _crowded(vendor: str, crowded: bool) -> None:
    """Two thirds of the process's waiters for ``vendor``'s tokens wait (stop taking its queue), or a third again."""
    (gate.crowd if crowded else gate.uncrowd)(vendor)


throttle.watch(_crowded)


class ThrottledReject(Reject):
    """The message goes back on its queue: the vendor's tokens are all spoken for, or it is down."""


class Waiting(Exception):
    """What a parked delivery shows while an earlier call of the same person goes first (Flower: RETRY)."""


class RedisFull(Reject):
    """Redis refused to record this delivery's outcome (maxmemory): requeue it, never acknowledge it. A full
    Redis refuses the requeue too; the message then stays held in Redis and comes back when it has room."""


class _QuietThrottledRejects(logging.Filter):
    """Celery logs every Reject as a warning with a traceback; a throttled requeue is routine."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ThrottledReject):
            log.debug("requeued: %s", exc.reason)
            return False
        return not isinstance(exc, RedisFull)  # the task logged it, without a traceback


logging.getLogger("celery.app.trace").addFilter(_QuietThrottledRejects())

@app.task(bind=True, name=DELIVER_TASK, max_retries=None, acks_late=True, reject_on_worker_lost=True)
def deliver(self, vendor: Any = None, event: Any = None, *extra_args: Any, **extra_kwargs: Any) -> str:
    if extra_args or extra_kwargs:  # not a message we sent: the pipeline dead-letters it as malformed
        event = {"unexpected_arguments": {"args": [event, *extra_args], "kwargs": extra_kwargs}}
    request = self.request
    tag = (request.properties or {}).get("delivery_tag")
    headers = vars(request)
    try:
        result = attempt(vendor, event, RetryState.from_headers(headers), request.id, tag, request.retries,
                         person=headers.get(HEADER))
    except Throttled as throttled:
        gate.pause(throttled.vendor, throttled.retry_after)
        raise ThrottledReject(str(throttled), requeue=True) from None
    except VendorDown as down:
        gate.hold(down.vendor)
        raise ThrottledReject(str(down), requeue=True) from None
    except redis.OutOfMemoryError as exc:  # the retry schedule, a dead letter, the limiter: not recorded
        transport.FULLNESS.seen(exc)
        log.warning("%s: %s not recorded, delivered again once Redis has room: %s", REDIS_FULL,
                    request.id, exc)
        raise RedisFull(str(exc), requeue=True) from None
    except DeadLettered:
        raise
    except Exception as exc:  # noqa: BLE001 - anything else: retried with a record, never acknowledged without one
        result = unexpected(vendor, event, headers, request.id, request.retries, tag, exc)
    # The result is a short string: Celery logs (and sends Flower) its repr for every task, and its safe repr
    # of a dict cost ~30 µs of a delivery's CPU, a string's ~4.
    if isinstance(result, Delivered):
        return f"{result.vendor}: {result.status}, attempt {result.attempt}, {round(result.elapsed * 1000)} ms"
    if isinstance(result, Merged):
        return f"{result.vendor}: merged, delivered in another call's request"
    if isinstance(result, Parked):  # parked under the person (this message acknowledged): back when it is its turn
        raise Retry(f"waiting behind {result.holder}", exc=Waiting(f"{result.vendor}: waiting behind {result.holder}"))
    if isinstance(result, Yielded):
        raise ThrottledReject(f"{result.vendor}: the person's turn went on without this call", requeue=True)
    # Already on the retry schedule, and this message acknowledged: tell Celery (and Flower) it is a retry.
    raise Retry(result.error, exc=RetryableError(result.error), when=result.countdown)
