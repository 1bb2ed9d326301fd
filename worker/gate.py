"""Pause and resume consuming a vendor's queue inside a running Celery worker.

A consumer bootstep records the worker's consumer; :func:`pause` (safe to
call from any delivery thread) hands the work to the consumer's own loop,
which stops fetching from the queue and resumes after ``seconds``. Outside a
worker (e.g. a test calling the pipeline) it does nothing.

Example::

    >>> pause("loops", 0.2)   # no-op outside a worker
"""

from __future__ import annotations

import logging
import threading

from celery import bootsteps

log = logging.getLogger(__name__)

#: Shortest and longest pause, in seconds.
MIN_PAUSE = 0.05
MAX_PAUSE = 2.0

_consumer = None
_paused: set[str] = set()
_lock = threading.Lock()


class QueueGate(bootsteps.StartStopStep):
    """Consumer bootstep: remembers the consumer so :func:`pause` can reach it."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, c) -> None:
        global _consumer
        _consumer = c

    def stop(self, c) -> None:
        global _consumer
        _consumer = None
        _paused.clear()

    shutdown = stop


def pause(queue: str, seconds: float) -> None:
    c = _consumer
    if c is None:
        return
    with _lock:
        if queue in _paused:
            return
        _paused.add(queue)
    seconds = min(MAX_PAUSE, max(MIN_PAUSE, seconds))
    c.call_soon(_pause, c, queue, seconds)


def _pause(c, queue: str, seconds: float) -> None:
    try:
        c.task_consumer.cancel_by_queue(queue)
        log.debug("paused queue %s for %.3fs", queue, seconds)
    except Exception:  # the consumer may be restarting; resuming below is harmless
        log.exception("could not pause queue %s", queue)
    c.timer.call_after(seconds, _resume, (c, queue))


def _resume(c, queue: str) -> None:
    try:
        if c is _consumer and c.task_consumer is not None:
            if not c.task_consumer.consuming_from(queue):
                c.task_consumer.add_queue(c.app.amqp.queues[queue])
                c.task_consumer.consume()
    except Exception:
        log.exception("could not resume queue %s", queue)
    finally:
        with _lock:
            _paused.discard(queue)
