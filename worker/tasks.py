"""The one Celery task: deliver an event to a vendor. Thin on purpose.

Task name ``worker.deliver``, arguments ``(vendor, event)`` — the vendor's
name and the event's JSON; never a credential. It is routed to the queue named
after the vendor. The work is :meth:`worker.pipeline.Pipeline.deliver`; this
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
  with requeue, which our transport (``worker/transport.py``) leaves held in
  Redis until Redis has room, then puts back on its queue.

Example::

    >>> deliver.delay("loops", {"id": "e1", "operation": "track", ...})   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import redis
from celery.exceptions import Reject, Retry

from . import observability, ordering, transport
from .app import app
from .errors import DeadLettered
from .limits import gate
from .limits.throttle import Throttled
from .pipeline import Delivered, Merged, Parked, Pipeline, RetryableError, RetryLater, VendorDown, Yielded
from .publisher import TaskMessages
from .redisconf import REDIS_FULL
from .retries import ticker
from .retries.attempts import RetryState

DELIVER_TASK = "worker.deliver"

log = logging.getLogger(__name__)


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

@functools.cache
def _templates() -> TaskMessages:
    """The process's message template (Celery builds it once)."""
    return TaskMessages(app)


def _retry_message(vendor: str, event: dict[str, Any], task_id: str, retries: int, state: RetryState,
                   person: str | None = None) -> str:
    headers = {**state.header(), **({ordering.HEADER: person} if person else {})}
    return _templates().retry(vendor, event, task_id, retries, headers)


def _schedule(pipeline: Pipeline, vendor: str, event: dict[str, Any], task_id: str, retries: int,
              result: RetryLater, tag: str | None, person: str | None) -> None:
    """Put the next attempt on the vendor's retry schedule and acknowledge message ``tag``, in one script."""
    message = _retry_message(vendor, event, task_id, retries + 1, result.state, person)
    assert pipeline.schedule is not None, "the default pipeline has a retry schedule"
    pipeline.schedule.add(vendor, message, result.countdown, ack_tag=tag)


def attempt(vendor: Any, event: Any, state: RetryState, task_id: str, tag: str | None, retries: int,
            probe: bool = False, person: Any = None) -> Delivered | RetryLater | Merged | Parked | Yielded:
    """One attempt; a retry is on the schedule (and message ``tag`` acknowledged) when this returns.

    ``person``: the message's :data:`worker.ordering.HEADER` — the call is kept in that person's order; a call
    that must wait is parked (its message acknowledged in the same step), and a retry keeps the person's turn
    until it is due.

    Raises what :meth:`Pipeline.deliver` raises: DeadLettered, Throttled, VendorDown.
    """
    pipeline = Pipeline.default()
    person = person if isinstance(person, str) and person else None
    defer = None
    if tag and not probe:  # a Celery delivery: the turn ends with the message's acknowledgement
        def defer(end: Callable[[str], object]) -> None:
            transport.ack_with(tag, functools.partial(end, tag))
    result = pipeline.deliver(vendor, event, attempt=state.next_attempt, task_id=task_id,
                              first_failure=state.first_failure, probe=probe, person=person, tag=tag,
                              park=lambda: _retry_message(vendor, event, task_id, retries, state, person),
                              defer=defer, claimed=transport.take_claim(tag) if person is not None else None)
    if isinstance(result, RetryLater):
        _schedule(pipeline, vendor, event, task_id, retries, result, tag, person)
        if person is not None:  # the person's later calls wait for this retry: the turn lasts until it is due
            pipeline.order(vendor).extend(person, task_id, result.countdown + pipeline.settings.visibility_timeout)
        ticker.poke()
    return result


def _unexpected(vendor: Any, event: Any, headers: dict[str, Any], request: Any, tag: str | None,
                error: Exception) -> RetryLater:
    """An attempt raised something unexpected: log it with its traceback, report it, and put the delivery on
    the retry schedule (a counted attempt; dead-lettered once the budget is spent). If Redis cannot take that
    record either, the message is left held in Redis (not acknowledged): it comes back after the visibility
    timeout."""
    log.error("unexpected error delivering %s to %s; retrying it", request.id, vendor, exc_info=error)
    observability.report_unexpected(error, str(vendor))
    pipeline = Pipeline.default()
    state = RetryState.from_headers(headers)
    person = headers.get(ordering.HEADER)
    person = person if isinstance(person, str) and person else None
    try:
        result = pipeline.unexpected(vendor, event, state.next_attempt, request.id, state.first_failure, error)
        _schedule(pipeline, vendor, event, request.id, request.retries, result, tag, person)
    except DeadLettered:
        raise
    except Exception:
        transport.keep_unacked(tag)
        log.error("could not record the retry of %s (%s): its message stays held and comes back after the "
                  "visibility timeout", request.id, vendor, exc_info=True)
        raise error from None
    ticker.poke()
    return result


@app.task(bind=True, name=DELIVER_TASK, max_retries=None, acks_late=True, reject_on_worker_lost=True)
def deliver(self, vendor: Any = None, event: Any = None, *extra_args: Any, **extra_kwargs: Any) -> dict[str, Any]:
    if extra_args or extra_kwargs:  # not a message we sent: the pipeline dead-letters it as malformed
        event = {"unexpected_arguments": {"args": [event, *extra_args], "kwargs": extra_kwargs}}
    request = self.request
    tag = (request.properties or {}).get("delivery_tag")
    headers = vars(request)
    try:
        result = attempt(vendor, event, RetryState.from_headers(headers), request.id, tag, request.retries,
                         person=headers.get(ordering.HEADER))
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
        result = _unexpected(vendor, event, headers, request, tag, exc)
    if isinstance(result, Delivered):
        return {"vendor": result.vendor, "status": result.status, "attempt": result.attempt,
                "ms": round(result.elapsed * 1000)}
    if isinstance(result, Merged):
        return {"vendor": result.vendor, "merged": True}
    if isinstance(result, Parked):  # parked under the person (this message acknowledged): back when it is its turn
        raise Retry(f"waiting behind {result.holder}", exc=Waiting(f"{result.vendor}: waiting behind {result.holder}"))
    if isinstance(result, Yielded):
        raise ThrottledReject(f"{result.vendor}: the person's turn went on without this call", requeue=True)
    # Already on the retry schedule, and this message acknowledged: tell Celery (and Flower) it is a retry.
    raise Retry(result.error, exc=RetryableError(result.error), when=result.countdown)
