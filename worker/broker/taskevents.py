"""Task events for Flower, published in batches: one ``task.multi`` message per 24+ events or 0.1 s, on any pool.

A worker sends three task events per delivery (received, started, succeeded) so that Flower can show it.
Celery buffers them and publishes the buffer on the next turn of its event loop (the threads pool), or each
event at once where there is no loop (the gevent pool). Either way nearly every event became its own Redis
``PUBLISH``, each through a new redis-py client that kombu builds for the purpose: measured on one worker
process draining 6,000 track deliveries (threads pool, 32 threads), 1.6 publishes per delivery without vendor
latency and 2.7 with 100 ms, and 1.91 and 2.29 ms of worker CPU per delivery. With the batch below: 0.24 and
0.16 publishes, 1.52 and 1.56 ms, and 614 deliveries/s instead of 499.

:class:`TaskEventBatch` makes the batch the same on every pool: the task events wait in the dispatcher's
buffer until :data:`EVENT_BATCH` of them are there (Celery's own buffer limit) or :data:`EVENT_FLUSH` seconds
after the first one. Flower reads both forms; it sees an event at most 0.1 s later than it would have (on
the threads pool, a little later still while the loop sleeps: until its next turn, as before). What is
buffered at shutdown is published then; what a SIGKILL loses is what Flower would show of the last 0.1 s,
never a delivery.

On the threads pool the events are sent from the pool's threads; the flush is scheduled on the loop's own
thread (``hub.call_soon``, as Celery does), where its timer lives. The dispatcher's own lock keeps a flush
and a send from losing an event.

**One flush at a time.** Celery's ``send`` flushes in the sending thread (or greenlet) whenever the buffer
holds a batch; while that flush writes to the socket, every other sender that finds a full buffer waited for
the dispatcher's lock and then published what had come in meanwhile: batches of a few events, the more of them
the more deliveries run at once (100 ms vendor latency, gevent pool: 0.27 publishes per delivery instead of
0.125). Here a sender that finds a flush under way goes on; the flush under way, or the timer it arms when it
ends, takes what came in.

Example::

    app.steps["consumer"].add(TaskEventBatch)    # worker/broker/app.py
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from .green import green

log = logging.getLogger(__name__)

#: Task events published in one message (Celery's own buffer limit).
EVENT_BATCH = 24
#: Seconds a buffered task event waits at most for the batch to fill.
EVENT_FLUSH = 0.1


class TaskEventBatch(bootsteps.StartStopStep):
    """Consumer bootstep: buffers task events and publishes them a batch at a time, on either pool."""

    requires = {"celery.worker.consumer.events:Events"}

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._due = False  # a flush is scheduled (read and set without a lock: at worst one flush too many)
        self._timer: Any = None
        self._publish: Any = None  # the dispatcher's own flush (the instance's is replaced while started)

    def start(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is None or not dispatcher.enabled:
            return
        dispatcher.buffer_group = frozenset({"task"})
        dispatcher.buffer_limit = EVENT_BATCH
        self._due = False
        hub = c.hub
        on_loop = not green(c)
        publish = self._publish = dispatcher.flush
        # A flush is under way: read and set without a lock, as _due (at worst two flushes, one waiting for the
        # dispatcher's lock, as before). Not a lock: gevent's yields to the hub whenever a try finds it taken.
        busy = [False]

        def publish_once(errors: bool = True, groups: bool = True) -> bool:
            """The dispatcher's flush, unless one is under way (False: it takes what came in, or its timer)."""
            if busy[0]:
                return False
            busy[0] = True
            try:
                publish(errors=errors, groups=groups)
            finally:
                busy[0] = False
            return True

        def flush_once(errors: bool = True, groups: bool = True) -> None:
            """What Celery's send calls when a batch is full."""
            if publish_once(errors, groups):
                # Events sent during the write with the buffer still full called this, not the timer: they wait
                # at most EVENT_FLUSH. (The timer's own flush does not re-arm: an event sent meanwhile arms it.)
                soon()

        def flush() -> None:
            self._due = False  # first: an event sent while this flush runs schedules the next one
            self._timer = None
            try:
                publish_once(errors=on_loop)  # the loop's flush also retries what failed offline
            except Exception as exc:  # noqa: BLE001 - the broker away: kept, sent with the next batch
                log.debug("task events not published: %s", exc)

        if not on_loop:  # a green pool: its timer takes calls from any greenlet

            def soon() -> None:
                if not self._due:
                    self._due = True
                    self._timer = c.timer.call_after(EVENT_FLUSH, flush)

        else:  # the event loop: its timer belongs to the loop's thread; events come from the pool's threads

            def later() -> None:
                self._timer = hub.call_later(EVENT_FLUSH, flush)

            def soon() -> None:
                if not self._due:
                    self._due = True
                    hub.call_soon(later)

        dispatcher.on_send_buffered = soon
        dispatcher.flush = flush_once  # what Celery's send calls when a batch is full

    def stop(self, c: Any) -> None:
        if self._timer is not None:
            try:
                self._timer.cancel()
            except Exception:  # noqa: BLE001 - the loop is gone already
                pass
            self._timer = None
        dispatcher = getattr(c, "event_dispatcher", None)
        if dispatcher is not None and self._publish is not None:
            dispatcher.flush = self._publish  # waits for a flush under way, then publishes the rest
            self._publish = None
        if dispatcher is not None and dispatcher.buffer_group:
            try:
                dispatcher.flush(errors=False)  # what the last deliveries sent
            except Exception as exc:  # noqa: BLE001 - shutting down: nothing more to do
                log.debug("task events not published at shutdown: %s", exc)
        self._due = False

    shutdown = stop
