"""Waiting for a vendor's token without letting one vendor take over a worker.

A delivery thread that must wait for a token becomes a *waiter*. Each process
keeps at most ``max_waiters`` per vendor; a delivery arriving when they are all
taken (and no token is free right now) raises :class:`Throttled`, and the task
puts its message back on the vendor's queue and pauses that queue for a moment
(:mod:`worker.gate`). So a throttled vendor holds a few threads, never the
whole pool, and waiting never counts as an attempt.

A waiter takes a last look at its slot when it wakes, on Redis' clock
(:meth:`~worker.limits.ratelimit.RateLimiter.hold`): if it woke later than its slot
by more than the limiter's ``tolerance`` (a busy machine), it does not send late,
which could crowd the vendor's window, but gives the slot up and takes a new one.
So does a waiter whose slot a ``Retry-After`` pause or a lower effective rate
revoked while it slept (so the waiters of every process resume after the
pause one slot apart, never together).
The queue pause of a throttled delivery is shorter than the wait for the next
free slot (``RESUME_LEAD`` earlier), so new deliveries are at hand when it comes.

A throttled delivery costs a whole task run for nothing (the take, the task's
events, a rejection, the requeue): at full load against a strict 50/s from one
process, about 35 a second beside 50 deliveries, and the CPU they took made the
waiters wake late for their slots (~4 % of the slots went unused). So the
throttle also tells its listeners (:func:`watch`) when two thirds of a vendor's
waiters are taken, and again when a third of them are: the worker stops taking
that vendor's messages meanwhile (:func:`worker.broker.gate.crowd`) and they wait
in Redis instead; the last third is for the deliveries the worker had taken
before it stopped.

Example::

    >>> from worker.limits.ratelimit import Unlimited
    >>> Throttle().wait("loops", Unlimited())   # returns at once: a token was free
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable

from ..settings import TOKEN_WAIT_MAX
from .ratelimit import RateLimiter

log = logging.getLogger(__name__)

#: Threads per process that may wait for one vendor's tokens at a time: the worker stops taking the vendor's
#: messages at two thirds of them (:func:`watch`), and takes them again at a third.
DEFAULT_MAX_WAITERS = 8
#: How far ahead (seconds) a waiter may reserve a token.
DEFAULT_HORIZON = 2.0
#: A throttled vendor's queue resumes this many seconds (or half the wait, if less) before the next free slot.
RESUME_LEAD = 0.25
#: A waiter that keeps waking too late takes at most this many new slots, then sends anyway.
MAX_LATE_RETAKES = 3
#: Seconds after a delivery last found no token free at once during which its vendor's limit counts as binding
#: (:func:`room`): longer than a throttled queue's pause (at most 2 s, :mod:`worker.broker.gate`) plus the
#: horizon, in which no delivery of it comes to find out.
BINDING_FOR = 5.0
#: Seconds a thread may wait for a token in all; then its message is requeued (:class:`Throttled`), so no
#: delivery holds its message longer than the broker's visibility timeout allows for (the settings count it in).
DEFAULT_MAX_TOTAL = TOKEN_WAIT_MAX


#: Told ``(vendor, True)`` when two thirds of a throttle's waiters for ``vendor`` are taken, ``(vendor, False)``
#: when no more than a third are again (:func:`watch`).
Listener = Callable[[str, bool], None]
_listeners: list[Listener] = []


def watch(listener: Listener) -> None:
    """Call ``listener(vendor, crowded)`` as the waiters for ``vendor``'s tokens fill up to two thirds of the
    most (True) and fall back to a third (False), from the delivery thread that filled or freed them."""
    if listener not in _listeners:
        _listeners.append(listener)


def _tell(vendor: str, crowded: bool) -> None:
    for listener in list(_listeners):
        try:
            listener(vendor, crowded)
        except Exception:  # a listener's failure must not fail the delivery that told it
            log.exception("throttle listener %r failed for %s", listener, vendor)


class Throttled(Exception):
    """No token now and enough threads already waiting: requeue, retry in ``retry_after`` s."""

    def __init__(self, vendor: str, retry_after: float) -> None:
        self.vendor = vendor
        self.retry_after = retry_after
        super().__init__(f"{vendor}: rate limited, next token in {retry_after:.3f}s")


class Throttle:
    def __init__(
        self,
        max_waiters: int = DEFAULT_MAX_WAITERS,
        horizon: float = DEFAULT_HORIZON,
        sleep: Callable[[float], None] = time.sleep,
        max_total: float = DEFAULT_MAX_TOTAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_waiters = max_waiters
        #: Waiters at which the listeners are told a vendor is crowded, and at which no longer.
        self.crowd_at = max(1, max_waiters * 2 // 3)
        self.uncrowd_at = min(self.crowd_at - 1, max_waiters // 3)
        self.horizon = horizon
        self.sleep = sleep
        self.max_total = max_total
        self.clock = clock
        self._lock = threading.Lock()
        self._waiters: Counter[str] = Counter()
        #: Vendors whose waiters reached ``crowd_at`` and have not yet fallen to ``uncrowd_at`` (listeners told so).
        self._crowded: set[str] = set()
        self._binding: dict[str, float] = {}
        with _throttles_lock:
            _throttles.add(self)

    def waiting(self, vendor: str) -> int:
        return self._waiters[vendor]

    def binds(self, vendor: str) -> bool:
        """Whether ``vendor``'s limit binds in this throttle: a delivery found no token free at once in the last
        :data:`BINDING_FOR` seconds."""
        since = self._binding.get(vendor)
        return since is not None and self.clock() - since <= BINDING_FOR

    def wait(self, vendor: str, limiter: RateLimiter) -> float | None:
        """Return when this thread holds a token for ``vendor``; raise :class:`Throttled` instead of queueing up.
        Returns the latest moment (``time.monotonic()``) the request may leave on it, or None (any time): later,
        it must not go (:class:`worker.clients.SlotMissed`) and this thread waits for another token."""
        now = limiter.acquire(max_wait=0.0)
        if now.granted:
            admission = limiter.hold(now, self.sleep)
            if admission.admitted:  # a token now (and its answer read in time)
                return admission.send_by
        self._binding[vendor] = self.clock()
        with self._lock:
            full = self._waiters[vendor] >= self.max_waiters
            if not full:
                self._waiters[vendor] += 1
            crowded = self._waiters[vendor] >= self.crowd_at and vendor not in self._crowded
            if crowded:
                self._crowded.add(vendor)
        if crowded:
            _tell(vendor, True)
        if full:
            raise Throttled(vendor, now.wait - min(RESUME_LEAD, now.wait / 2))
        retakes = 0
        give_up = self.clock() + self.max_total
        try:
            while True:
                if self.clock() >= give_up:
                    raise Throttled(vendor, self.horizon)
                r = limiter.acquire(max_wait=min(self.horizon, max(0.0, give_up - self.clock())))
                if r.granted:
                    # The last look, on Redis' clock: a slot revoked meanwhile (a Retry-After pause, a lower
                    # rate) or one this thread woke too late for is given up, and another taken.
                    admission = limiter.hold(r, self.sleep, strict=retakes < MAX_LATE_RETAKES)
                    if admission.admitted:
                        return admission.send_by
                    retakes += admission.why == "late"
                    continue
                self.sleep(min(self.horizon, max(r.wait - self.horizon, 0.001), max(0.0, give_up - self.clock())))
        finally:
            with self._lock:
                self._waiters[vendor] -= 1
                roomy = vendor in self._crowded and self._waiters[vendor] <= self.uncrowd_at
                if roomy:
                    self._crowded.discard(vendor)
            if roomy:
                _tell(vendor, False)


#: Every throttle of this process (one per delivery pipeline); added to and read under the lock: a pipeline is made
#: on a delivery thread while the consumer's thread may be reading them (:func:`room`).
_throttles: weakref.WeakSet[Throttle] = weakref.WeakSet()
_throttles_lock = threading.Lock()


def room(vendor: str) -> int | None:
    """How many more of ``vendor``'s deliveries this process's consumer should take at once: none beyond one while
    its rate limit binds in a throttle of the process (:meth:`Throttle.binds`), else None (no cap). The consumer
    then takes such a vendor's messages one at a time (:mod:`worker.broker.transport`), as fast as its tokens come:
    a take of several would mostly be thrown back (:class:`Throttled`) and put on the queue again.

    >>> room("a-vendor-never-throttled") is None
    True
    """
    with _throttles_lock:
        throttles = list(_throttles)
    return 0 if any(t.binds(vendor) for t in throttles) else None
