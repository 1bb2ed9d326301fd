"""What a worker without Celery's event loop does differently: the gevent pool (``-P gevent``).

Celery's threads pool runs its consumer on an event loop (kombu's hub): a timer restores a dead worker's
unacknowledged messages every ``unacked_restore_interval``. A green pool has no such loop: its consumer calls
``drain_events`` in a loop (Celery's ``synloop``). Left as kombu and Celery make it:

- kombu restores unacknowledged messages only after a poll that brought nothing, and then on every such
  poll: a busy worker never restores a dead worker's messages, an idle one scans Redis many times a second;
- every task event (received, started, succeeded: three per delivery) is its own Redis ``PUBLISH``, each
  through a new redis-py client: a third of the worker's CPU on the gevent pool (now batched on every pool:
  :mod:`worker.broker.taskevents`);
- gevent records, for every greenlet it spawns, the greenlet that spawned it and that one's stack (a
  debugging aid, ``track_greenlet_tree``): ten frame objects per task, left in reference cycles;
- the consumer waits in ``drain_events`` up to 2 s at a time, also after a delivery freed the prefetch window
  (it stopped taking messages while it was full) or the queue gate (:mod:`worker.broker.gate`) gave a queue
  back: up to 2 s lost each time.

The consumer bootstep :class:`GreenStep` puts these right when the consumer has no event loop: spawning trees
are not recorded on gevent (the setting gevent's documentation gives for faster spawning); the restore
runs on the worker's timer every ``unacked_restore_interval`` seconds (and at most that often after empty
polls: :attr:`worker.broker.transport.Poller.restore_every`); and the consumer's wait can be ended
(:meth:`worker.broker.transport.Poller.wake`: the transport does it when the prefetch window frees, the gate
when it changes a queue). With the threads pool it does nothing.

Example::

    $ celery -A worker worker -P gevent -c 200    # the step logs: "green pool: ..."
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)

def green(c: Any) -> bool:
    """Does consumer ``c`` run without Celery's event loop (a green pool's ``synloop``)?"""
    return c.hub is None


class GreenStep(bootsteps.StartStopStep):
    """Consumer bootstep: on a worker without the event loop, restores on a timer."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._timers: list[Any] = []

    def start(self, c: Any) -> None:
        if not green(c):
            return
        gevent = sys.modules.get("gevent")
        if gevent is not None:  # eventlet keeps no such tree
            gevent.config.track_greenlet_tree = False
        self._restore_on_timer(c)

    def _restore_on_timer(self, c: Any) -> None:
        cycle = getattr(c.connection.transport, "cycle", None)
        if cycle is None or not hasattr(cycle, "restore_every"):
            return  # not this package's Redis transport
        options = c.connection.transport_options or {}
        interval = float(options.get("unacked_restore_interval") or 10.0)
        cycle.restore_every = interval
        cycle.enable_wakeups()

        def restore() -> None:
            try:
                cycle.maybe_restore_messages()
            except Exception as exc:  # noqa: BLE001 - Redis away: the next round tries again
                log.debug("restoring unacknowledged messages: %s", exc)

        self._timers.append(c.timer.call_repeatedly(interval, restore))
        log.info("no event loop (%s pool): unacknowledged messages restored every %gs on a timer",
                 type(c.pool).__module__.rsplit(".", 1)[-1], interval)

    def stop(self, c: Any) -> None:
        for tref in self._timers:
            tref.cancel()
        self._timers.clear()

    shutdown = stop
