"""The one Celery task: deliver an event to a vendor. Thin on purpose.

Task name ``worker.deliver``, arguments ``(vendor, event)`` — the vendor's
name and the event's JSON; never a credential. It is routed to the queue named
after the vendor. The work is :meth:`worker.pipeline.Pipeline.deliver`; this
module only maps its results onto Celery: a retry becomes ``self.retry``
(Flower: RETRY), a dead letter ends the task with
:class:`~worker.errors.DeadLettered` (Flower: FAILURE), and a throttled
vendor's message goes back on its queue (no attempt counted).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import Reject

from . import gate
from .app import app
from .pipeline import Delivered, Pipeline, RetryableError
from .throttle import Throttled

DELIVER_TASK = "worker.deliver"

log = logging.getLogger(__name__)


class ThrottledReject(Reject):
    """The message goes back on its queue: the vendor's tokens are all spoken for."""


class _QuietThrottledRejects(logging.Filter):
    """Celery logs every Reject as a warning with a traceback; a throttled requeue is routine."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ThrottledReject):
            log.debug("requeued: %s", exc.reason)
            return False
        return True


logging.getLogger("celery.app.trace").addFilter(_QuietThrottledRejects())


@app.task(bind=True, name=DELIVER_TASK, max_retries=None, acks_late=True, reject_on_worker_lost=True)
def deliver(self, vendor: Any = None, event: Any = None, *extra_args: Any, **extra_kwargs: Any) -> dict[str, Any]:
    if extra_args or extra_kwargs:  # not a message we sent: the pipeline dead-letters it as malformed
        event = {"unexpected_arguments": {"args": [event, *extra_args], "kwargs": extra_kwargs}}
    try:
        result = Pipeline.default().deliver(vendor, event, attempt=self.request.retries + 1, task_id=self.request.id)
    except Throttled as throttled:
        gate.pause(throttled.vendor, throttled.retry_after)
        raise ThrottledReject(str(throttled), requeue=True) from None
    if isinstance(result, Delivered):
        return {"vendor": result.vendor, "status": result.status, "attempt": result.attempt,
                "ms": round(result.elapsed * 1000)}
    raise self.retry(countdown=result.countdown, exc=RetryableError(result.error), max_retries=None)
