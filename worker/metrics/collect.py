"""Counting in a worker process: in memory on the delivery path, flushed to Redis about once a second.

A :class:`Recorder` adds each outcome, 429 and request duration to in-process
counts under a lock (no Redis call on the delivery path). Its :class:`Flusher`
thread adds them to the shared hash (:func:`~worker.metrics.schema.counters_key`)
every ``METRICS_FLUSH_INTERVAL`` seconds, all in one MULTI/EXEC of HINCRBY and
HINCRBYFLOAT, so the totals are global across every process on every host and a
reader never sees half a flush. A flush that fails (Redis away) keeps its counts
for the next one. A clean shutdown flushes what is left; a process that is
SIGKILLed loses at most its last interval of counts.

Example::

    >>> r = Recorder()
    >>> r.record("loops", DELIVERED)
    >>> r.request("loops", 0.03, status=429)
    >>> counts = r.pending()
    >>> counts["deliveries|loops|delivered"], counts["rate_limited|loops"], counts["request_duration|loops|le|0.05"]
    (1, 1, 1)
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping

import redis

from .schema import (
    DEAD_LETTERED,
    DEAD_LETTERS,
    DELIVERED,
    DELIVERIES,
    OUTCOMES,
    RATE_LIMITED,
    REQUEST_DURATION,
    bucket_of,
    counters_key,
    field,
    reason_label,
    vendor_label,
)

log = logging.getLogger(__name__)

__all__ = ["DEAD_LETTERED", "DELIVERED", "Flusher", "Recorder"]


class Recorder:
    """This process's counts since its last flush. Thread-safe; ``enabled=False`` records nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._sums: defaultdict[str, float] = defaultdict(float)

    # -- the delivery path ----------------------------------------------------

    def record(self, vendor: str, outcome: str, reason: str | None = None, count: int = 1) -> None:
        """``count`` delivery attempts ended: ``outcome`` is delivered, retried, merged or dead_lettered (with its
        ``reason``)."""
        if not self.enabled:
            return
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; one of {OUTCOMES}")
        v = vendor_label(vendor)
        with self._lock:
            self._counts[field(DELIVERIES, v, outcome)] += count
            if outcome == DEAD_LETTERED:
                self._counts[field(DEAD_LETTERS, v, reason_label(reason))] += count

    def request(self, vendor: str, seconds: float, status: int | None) -> None:
        """One HTTP exchange with a vendor took ``seconds``; ``status`` None: no answer (timeout, network)."""
        if not self.enabled:
            return
        v = vendor_label(vendor)
        with self._lock:
            self._counts[field(REQUEST_DURATION, v, "le", bucket_of(seconds))] += 1
            self._sums[field(REQUEST_DURATION, v, "sum")] += seconds
            if status == 429:
                self._counts[field(RATE_LIMITED, v)] += 1

    # -- flushing -------------------------------------------------------------

    def pending(self) -> dict[str, float]:
        """What the next flush would add (a copy)."""
        with self._lock:
            return {**self._counts, **self._sums}

    def take(self) -> tuple[Counter[str], dict[str, float]]:
        """Hand over the counts so far (integer counts, float sums) and start again from zero."""
        with self._lock:
            counts, sums = self._counts, self._sums
            self._counts, self._sums = Counter(), defaultdict(float)
        return counts, sums

    def give_back(self, counts: Counter[str], sums: Mapping[str, float]) -> None:
        """A flush failed: its counts go into the next one."""
        with self._lock:
            self._counts.update(counts)
            for name, x in sums.items():
                self._sums[name] += x

    def flush(self, client: redis.Redis, prefix: str) -> bool:
        """Add the counts to Redis in one transaction; False (counts kept) if Redis did not take them."""
        counts, sums = self.take()
        if not counts and not sums:
            return True
        key = counters_key(prefix)
        try:
            pipe = client.pipeline(transaction=True)
            for name, n in counts.items():
                pipe.hincrby(key, name, n)
            for name, x in sums.items():
                pipe.hincrbyfloat(key, name, x)
            pipe.execute()
        except redis.RedisError as exc:
            # An EXEC that reached Redis but whose answer was lost would count twice; Redis being away
            # before EXEC is the common case, and then nothing was applied.
            self.give_back(counts, sums)
            log.debug("metrics: flush failed, kept for the next one: %s", exc)
            return False
        return True


class Flusher(threading.Thread):
    """Flushes a :class:`Recorder` every ``interval`` seconds until :meth:`stop`, which flushes once more."""

    def __init__(self, recorder: Recorder, client: Callable[[], redis.Redis], prefix: str, interval: float) -> None:
        super().__init__(name="metrics-flusher", daemon=True)
        self.recorder = recorder
        self.client = client
        self.prefix = prefix
        self.interval = interval
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.flush()

    def flush(self) -> bool:
        try:
            return self.recorder.flush(self.client(), self.prefix)
        except Exception:  # never let bookkeeping stop the thread
            log.exception("metrics: flush failed")
            return False

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread and flush what is left; returns whether that last flush reached Redis."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout)
        return self.flush()
