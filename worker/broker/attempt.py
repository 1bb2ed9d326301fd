"""One delivery attempt of a taken message, and what its outcome leaves in Redis; Celery's task is not here.

:func:`attempt` runs the pipeline for one message the transport took (or the probe claimed), ends its
person's turn with the message's acknowledgement, and puts a failed attempt on the vendor's retry schedule
in the same script that acknowledges the message. :func:`unexpected` does the same for an attempt that
raised something unforeseen. The task (:mod:`worker.broker.tasks`) and the breaker's probe
(:mod:`worker.broker.probe`) both call these, and map the results onto Celery or onto the probe's outcome.

Example::

    >>> attempt("loops", event, RetryState(0, None), "e1.loops", tag, retries=0)   # doctest: +SKIP
    Delivered(vendor='loops', status=200, attempt=1, elapsed=0.031)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from .. import observability
from ..delivery.pipeline import Delivered, Merged, Parked, Pipeline, RetryLater, Yielded
from ..envelope import TaskMessages
from ..errors import DeadLettered
from ..keys import HEADER
from ..retries.attempts import RetryState
from ..retries.schedule import poke
from ..scripts import ScriptCall
from . import transport

log = logging.getLogger(__name__)


@functools.cache
def _templates() -> TaskMessages:
    """The process's message templates."""
    return TaskMessages()


def _retry_message(vendor: str, event: dict[str, Any], task_id: str, retries: int, state: RetryState,
                   person: str | None = None) -> str:
    # A fresh state (a park or a 429 before any counted failure) is what a message without the header reads as.
    headers = {**(state.header() if state != RetryState() else {}), **({HEADER: person} if person else {})}
    return _templates().retry(vendor, event, task_id, retries, headers)


def _schedule(pipeline: Pipeline, vendor: str, event: dict[str, Any], task_id: str, retries: int,
              result: RetryLater, tag: str | None, person: str | None) -> None:
    """Put the next attempt on the vendor's retry schedule and acknowledge message ``tag``, in one script."""
    message = _retry_message(vendor, event, task_id, retries + 1, result.state, person)
    assert pipeline.schedule is not None, "the default pipeline has a retry schedule"
    pipeline.schedule.add(vendor, message, result.countdown, ack_tag=tag)
    transport.acked(tag)


def attempt(vendor: Any, event: Any, state: RetryState, task_id: str, tag: str | None, retries: int,
            probe: bool = False, person: Any = None) -> Delivered | RetryLater | Merged | Parked | Yielded:
    """One attempt; a retry is on the schedule (and message ``tag`` acknowledged) when this returns.

    ``person``: the message's :data:`worker.delivery.HEADER` — the call is kept in that person's order; a call
    that must wait is parked (its message acknowledged in the same step), and a retry keeps the person's turn
    until it is due.

    Raises what :meth:`Pipeline.deliver` raises: DeadLettered, Throttled, VendorDown.
    """
    pipeline = Pipeline.default()
    person = person if isinstance(person, str) and person else None
    defer = None
    if tag and not probe:  # a Celery delivery: the turn ends with the message's acknowledgement
        def defer(end: Callable[[str], ScriptCall]) -> None:
            transport.ack_with(tag, end(tag))
    result = pipeline.deliver(vendor, event, attempt=state.next_attempt, task_id=task_id,
                              first_failure=state.first_failure, probe=probe, person=person, tag=tag,
                              park=lambda: _retry_message(vendor, event, task_id, retries, state, person),
                              defer=defer, claimed=transport.take_claim(tag) if person is not None else None)
    if isinstance(result, Parked):
        transport.acked(tag)  # the park acknowledged it
    if isinstance(result, RetryLater):
        _schedule(pipeline, vendor, event, task_id, retries, result, tag, person)
        if person is not None:  # the person's later calls wait for this retry: the turn lasts until it is due
            pipeline.order(vendor).extend(person, task_id, result.countdown + pipeline.settings.visibility_timeout)
        poke()
    return result


def unexpected(vendor: Any, event: Any, headers: dict[str, Any], task_id: str, retries: int, tag: str | None,
               error: Exception) -> RetryLater:
    """An attempt raised something unexpected: log it with its traceback, report it, and put the delivery on
    the retry schedule (a counted attempt; dead-lettered once the budget is spent). If Redis cannot take that
    record either, the message is left held in Redis (not acknowledged): it comes back after the visibility
    timeout."""
    log.error("unexpected error delivering %s to %s; retrying it", task_id, vendor, exc_info=error)
    observability.report_unexpected(error, str(vendor))
    pipeline = Pipeline.default()
    state = RetryState.from_headers(headers)
    person = headers.get(HEADER)
    person = person if isinstance(person, str) and person else None
    try:
        result = pipeline.unexpected(vendor, event, state.next_attempt, task_id, state.first_failure, error)
        _schedule(pipeline, vendor, event, task_id, retries, result, tag, person)
    except DeadLettered:
        raise
    except Exception:
        transport.keep_unacked(tag)
        log.error("could not record the retry of %s (%s): its message stays held and comes back after the "
                  "visibility timeout", task_id, vendor, exc_info=True)
        raise error from None
    poke()
    return result
