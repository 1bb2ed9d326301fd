"""The retry clock of one worker process: due retries back onto their queues, breakers followed.

A :class:`Ticker` thread runs in every worker process (a consumer bootstep
starts it for the vendor queues that worker consumes). Each round, per vendor:

1. move due retries from the schedule onto the queue (one atomic script a
   chunk; any number of processes may do it at once);
2. read the vendor's circuit breaker: while it is open (or the vendor is
   paused because it refuses the credentials), stop taking the
   queue's messages (:func:`~worker.broker.gate.hold`) and, when a probe is
   due and this process wins the lease, start one probe
   (:func:`~worker.broker.probe.run_probe`); once it is closed, take them again;
3. every :data:`SWEEP_EVERY` seconds, put back on the queue the messages parked
   behind a person's turn that nobody holds any more (its holder's lease ran out:
   :meth:`~worker.delivery.ordering.PersonLog.sweep`).

It sleeps until the next retry is due, at most ``interval`` seconds.

Example::

    >>> t = Ticker(["loops"], RetrySchedule.default(), breaker)   # doctest: +SKIP
    >>> t.start()                                                 # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable

from celery import bootsteps

from ..delivery.ordering import PersonLog
from ..retries.breaker import Breaker
from ..retries.schedule import WAKE, RetrySchedule
from .probe import run_probe

log = logging.getLogger(__name__)

#: Longest and shortest sleep between rounds, in seconds.
INTERVAL = 0.5
MIN_SLEEP = 0.02

#: Seconds between sweeps of parked messages whose person's turn nobody holds.
SWEEP_EVERY = 5.0

class Ticker(threading.Thread):
    def __init__(self, vendors: Iterable[str], schedule: RetrySchedule, breaker: Breaker, lease: float = 60.0,
                 hold: Callable[[str], None] | None = None, release: Callable[[str], None] | None = None,
                 interval: float = INTERVAL, orders: dict[str, PersonLog] | None = None,
                 sweep_after: float = 60.0) -> None:
        super().__init__(name="retry-ticker", daemon=True)
        from . import gate

        self.vendors = list(vendors)
        self.schedule = schedule
        self.breaker = breaker
        self.lease = lease
        self.hold = hold or gate.hold
        self.release = release or gate.release
        self.interval = interval
        self.orders = orders or {}
        self.sweep_after = sweep_after
        self._swept = 0.0
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._halt = threading.Event()
        self._probing: dict[str, threading.Thread] = {}

    def stop(self) -> None:
        self._halt.set()
        WAKE.set()

    def run(self) -> None:
        while not self._halt.is_set():
            WAKE.clear()
            sleep = self.interval
            if time.monotonic() - self._swept >= SWEEP_EVERY:
                self._swept = time.monotonic()
                self.sweep()
            for vendor in self.vendors:
                try:
                    sleep = min(sleep, self.tick(vendor))
                except Exception as exc:  # noqa: BLE001 - Redis away or restarting: the next round tries again
                    log.debug("retry ticker: %s: %s", vendor, exc)
            WAKE.wait(max(MIN_SLEEP, sleep))

    def sweep(self) -> None:
        """Unpark people whose turn nobody holds (parked longer than ``sweep_after``)."""
        for vendor, order in self.orders.items():
            try:
                swept = order.sweep(self.sweep_after)
            except Exception as exc:  # noqa: BLE001 - Redis away: the next sweep tries again
                log.debug("parked-message sweep: %s: %s", vendor, exc)
                continue
            if swept:
                log.warning("%s: %s people's parked calls back on the queue (their turn's holder went away)",
                            vendor, swept)

    def tick(self, vendor: str) -> float:
        """One round for ``vendor``; returns the seconds until its next retry is due (or the interval)."""
        moved, next_due = self.schedule.promote(vendor)
        if moved:
            log.info("%s: %s retries due, back on the queue", vendor, moved)
        if self.breaker.enabled:
            state = self.breaker.poll(vendor)
            if state.open:
                self.hold(vendor)
                if state.probe_due and not self._probe_running(vendor) \
                        and self.breaker.claim_probe(vendor, self.lease, self.holder):
                    self._start_probe(vendor)
            else:
                self.release(vendor)
        return self.interval if next_due is None else next_due

    def _probe_running(self, vendor: str) -> bool:
        thread = self._probing.get(vendor)
        return thread is not None and thread.is_alive()

    def _start_probe(self, vendor: str) -> None:
        thread = threading.Thread(target=run_probe, args=(vendor, self.schedule, self.breaker),
                                  name=f"probe-{vendor}", daemon=True)
        self._probing[vendor] = thread
        thread.start()


class TickerStep(bootsteps.StartStopStep):
    """Consumer bootstep: one :class:`Ticker` per worker process, for the vendor queues it consumes."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, c, **kwargs) -> None:
        super().__init__(c, **kwargs)
        self.ticker: Ticker | None = None

    def start(self, c) -> None:
        if self.ticker is not None and self.ticker.is_alive():
            return
        from ..delivery.pipeline import Pipeline
        from ..settings import get_settings
        from ..vendors import VENDORS

        consumed = set(c.app.amqp.queues.consume_from or c.app.amqp.queues)
        vendors = [v for v in VENDORS if v in consumed]
        pipeline = Pipeline.default()
        assert pipeline.schedule is not None and pipeline.breaker is not None, "the default pipeline has both"
        vt = get_settings().visibility_timeout
        self.ticker = Ticker(vendors, pipeline.schedule, pipeline.breaker, vt,
                             orders={v: pipeline.order(v) for v in vendors}, sweep_after=vt)
        self.ticker.start()

    def shutdown(self, c) -> None:
        if self.ticker is not None:
            self.ticker.stop()
            self.ticker = None
