"""Waiting for a vendor's token without letting one vendor take over a worker.

A delivery thread that must wait for a token becomes a *waiter*. Each process
keeps at most ``max_waiters`` per vendor; a delivery arriving when they are all
taken (and no token is free right now) raises :class:`Throttled`, and the task
puts its message back on the vendor's queue and pauses that queue for a moment
(:mod:`worker.gate`). So a throttled vendor holds a few threads, never the
whole pool, and waiting never counts as an attempt.

Example::

    >>> from worker.ratelimit import Unlimited
    >>> Throttle().wait("loops", Unlimited())   # returns at once: a token was free
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from .ratelimit import RateLimiter

#: Threads per process that may wait for one vendor's tokens at a time.
DEFAULT_MAX_WAITERS = 8
#: How far ahead (seconds) a waiter may reserve a token.
DEFAULT_HORIZON = 2.0


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
    ) -> None:
        self.max_waiters = max_waiters
        self.horizon = horizon
        self.sleep = sleep
        self._lock = threading.Lock()
        self._waiters: Counter[str] = Counter()

    def waiting(self, vendor: str) -> int:
        return self._waiters[vendor]

    def wait(self, vendor: str, limiter: RateLimiter) -> None:
        """Return when this thread holds a token for ``vendor``; raise :class:`Throttled` instead of queueing up."""
        now = limiter.acquire(max_wait=0.0)
        if now.granted:
            return
        with self._lock:
            full = self._waiters[vendor] >= self.max_waiters
            if not full:
                self._waiters[vendor] += 1
        if full:
            raise Throttled(vendor, now.wait)
        try:
            while True:
                r = limiter.acquire(max_wait=self.horizon)
                if r.granted:
                    self.sleep(r.wait)
                    return
                self.sleep(min(self.horizon, max(r.wait - self.horizon, 0.001)))
        finally:
            with self._lock:
                self._waiters[vendor] -= 1
