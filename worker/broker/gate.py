"""Pause and resume consuming a vendor's queue inside a running Celery worker.

A consumer bootstep records the worker's consumer; :func:`pause` (safe to
call from any delivery thread) hands the work to the consumer's own loop,
which stops fetching from the queue and resumes after ``seconds``. :func:`hold`
stops fetching until :func:`release` (a vendor whose circuit breaker is open);
:func:`limit` until :func:`unlimit` (the vendor's deliveries hold their share of
the worker's threads: :mod:`worker.broker.bulkhead`); :func:`crowd` until
:func:`uncrowd` (two thirds of the process's threads that may wait for the
vendor's tokens wait already: :mod:`worker.limits.throttle`). A queue is fetched from again only
when none of the four stops it: ending one never resumes a queue another still
stops. Outside a worker (e.g. a test calling the pipeline) they do nothing.

Example::

    >>> pause("loops", 0.2)   # no-op outside a worker
    >>> hold("loops"); release("loops")
    >>> limit("loops"); unlimit("loops")
    >>> crowd("loops"); uncrowd("loops")
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import bootsteps

from ..redisconf import REDIS_FULL

log = logging.getLogger(__name__)

#: Shortest and longest pause, in seconds.
MIN_PAUSE = 0.05
MAX_PAUSE = 2.0

#: The worker's consumer (celery.worker.consumer.Consumer, untyped) while it runs, else None.
_consumer: Any = None
_paused: set[str] = set()
_held: set[str] = set()
_full: set[str] = set()
_crowded: set[str] = set()
_lock = threading.Lock()
#: Queues whose resume failed (Redis refused the queue's declaration) and is being tried again.
_failing: set[str] = set()
#: Seconds before a resume that failed is tried again.
RESUME_RETRY = 1.0
#: The thread running the consumer's loop (its bootstep starts there), else None.
_consumer_thread: int | None = None


class QueueGate(bootsteps.StartStopStep):
    """Consumer bootstep: remembers the consumer so :func:`pause` can reach it."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, c) -> None:
        global _consumer, _consumer_thread
        _consumer = c
        _consumer_thread = threading.get_ident()

    def stop(self, c) -> None:
        global _consumer, _consumer_thread
        _consumer = None
        _consumer_thread = None
        _paused.clear()
        _held.clear()
        _full.clear()
        _crowded.clear()
        _failing.clear()

    shutdown = stop


def pause(queue: str, seconds: float) -> None:
    c = _consumer
    if c is None:
        return
    with _lock:
        if queue in _paused or queue in _held:
            return
        _paused.add(queue)
    seconds = min(MAX_PAUSE, max(MIN_PAUSE, seconds))
    _soon(c, _pause, c, queue, seconds)


def hold(queue: str) -> None:
    """Stop fetching from ``queue`` until :func:`release`."""
    c = _consumer
    if c is None:
        return
    with _lock:
        if queue in _held:
            return
        _held.add(queue)
    _soon(c, _cancel, c, queue)
    log.info("stopped taking messages from %s", queue)


def release(queue: str) -> None:
    """Fetch from ``queue`` again after :func:`hold`."""
    c = _consumer
    if c is None:
        return
    with _lock:
        if queue not in _held:
            return
        _held.discard(queue)
    _soon(c, _resume, c, queue)
    log.info("taking messages from %s again", queue)


def held(queue: str) -> bool:
    return queue in _held


def limit(queue: str) -> None:
    """Stop fetching from ``queue`` until :func:`unlimit`. Called on the consumer's own thread (as the bulkhead
    does when a message arrives) it stops at once: the consumer takes no further message from ``queue``."""
    if _stop(queue, _full):
        log.debug("stopped taking messages from %s: its deliveries hold their share of the threads", queue)


def unlimit(queue: str) -> None:
    """Fetch from ``queue`` again after :func:`limit`, unless a pause or :func:`hold` still stops it."""
    _go(queue, _full)


def limited(queue: str) -> bool:
    return queue in _full


def crowd(queue: str) -> None:
    """Stop fetching from ``queue`` until :func:`uncrowd`: two thirds of this process's threads that may wait for
    the vendor's tokens wait already, so the next messages would soon only be put back on the queue (each a
    throttled delivery: a whole task run, a rejection and a requeue, for nothing)."""
    if _stop(queue, _crowded):
        log.debug("stopped taking messages from %s: enough of its deliveries wait for tokens", queue)


def uncrowd(queue: str) -> None:
    """Fetch from ``queue`` again after :func:`crowd`, unless something else still stops it."""
    _go(queue, _crowded)


def crowded(queue: str) -> bool:
    return queue in _crowded


def _stop(queue: str, stops: set[str]) -> bool:
    """Add ``queue`` to ``stops`` and stop fetching it: at once on the consumer's own thread (inside a read, kombu
    cancels right after it: before the next take), else through its loop. False if it was there already (or no
    consumer runs)."""
    c = _consumer
    if c is None:
        return False
    with _lock:
        if queue in stops:
            return False
        stops.add(queue)
    if threading.get_ident() == _consumer_thread:
        _cancel(c, queue)
    else:
        _soon(c, _cancel, c, queue)
    return True


def _go(queue: str, stops: set[str]) -> None:
    """Take ``queue`` out of ``stops`` and fetch it again, unless another stop still holds it."""
    c = _consumer
    if c is None:
        return
    with _lock:
        if queue not in stops:
            return
        stops.discard(queue)
    _soon(c, _resume, c, queue)


def _soon(c, fn, *args) -> None:
    """Run ``fn(*args)`` on the consumer's loop (its thread, or its greenlet on the gevent pool), soon: its event
    loop wakes for it; without one (a green pool) the consumer's wait for messages is ended
    (:meth:`worker.broker.transport.Poller.wake`)."""
    c.call_soon(fn, *args)
    if c.hub is None:
        try:
            wake = c.connection.transport.cycle.wake
        except AttributeError:  # not this package's transport, or no connection now
            return
        wake()


def _cancel(c, queue: str) -> None:
    try:
        c.task_consumer.cancel_by_queue(queue)
    except Exception:  # the consumer may be restarting; a later hold or release puts it right
        log.exception("could not stop consuming queue %s", queue)


def _pause(c, queue: str, seconds: float) -> None:
    _cancel(c, queue)
    log.debug("paused queue %s for %.3fs", queue, seconds)
    # The timer's callback runs on the consumer's own loop with the threads pool, in a greenlet of its own on
    # the gevent pool: either way the resume itself is handed to the consumer.
    c.timer.call_after(seconds, _soon, (c, _resume, c, queue, True))


def _resume(c, queue: str, pause_over: bool = False) -> None:
    """Fetch from ``queue`` again unless something still stops it (``pause_over``: the end of a pause)."""
    with _lock:
        if pause_over:
            _paused.discard(queue)
        if queue in _held or queue in _full or queue in _paused or queue in _crowded:
            return
    try:
        if c is _consumer and c.task_consumer is not None:
            if not c.task_consumer.consuming_from(queue):
                c.task_consumer.add_queue(c.app.amqp.queues[queue])
                c.task_consumer.consume()
    except Exception as exc:  # noqa: BLE001 - whatever stopped it, giving up would stop the queue for good
        # kombu declares the queue again as it adds it: writes that a full Redis refuses (OutOfMemoryError) and an
        # unreachable one fails. Given up, the queue would stay unconsumed for the worker's life: try again.
        if c is not _consumer:
            return
        first = queue not in _failing
        _failing.add(queue)
        # Named as the transport names a full Redis (one line, no exception class: it is no traceback).
        why = f"{REDIS_FULL} ({exc})" if isinstance(exc, redis.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"
        log.log(logging.WARNING if first else logging.DEBUG, "could not take messages from %s again (%s); "
                "trying again every %g s", queue, why, RESUME_RETRY)
        c.timer.call_after(RESUME_RETRY, _soon, (c, _resume, c, queue))
        return
    if queue in _failing:
        _failing.discard(queue)
        log.warning("taking messages from %s again", queue)
