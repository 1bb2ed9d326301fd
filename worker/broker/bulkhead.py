"""A bulkhead per vendor: one vendor's deliveries never hold more than their share of a worker's threads.

``celery -A worker worker`` consumes every vendor queue with one pool of threads. A vendor that answers slowly
(200 after 8 s), hangs until the HTTP timeout, or whose deliveries wait for tokens keeps its threads busy; each
thread that comes free takes the next message, and the slow vendor's backlog ends up holding the pool while the
other vendors' messages wait behind it. The throttle (:mod:`worker.limits.throttle`) caps only the threads
waiting for a token.

Here each worker process counts the deliveries it holds per queue: a message counts from the moment the
consumer receives it (with prefetch it holds messages before a thread runs them) until its task has ended
(delivered, on the retry schedule, dead-lettered, or put back on its queue). When a queue's count reaches its
share of the threads, the consumer stops taking that queue (:func:`worker.broker.gate.limit`, before its next
take); when one of those deliveries ends, it takes the queue again — unless a throttle pause or an open
circuit breaker still stops it. A message already taken when the queue stops still runs, and nothing is
acknowledged any earlier: the bulkhead only decides what the consumer takes next.

The share is ``BULKHEAD_SHARE`` of the threads (half by default: 64 of 128) when the worker consumes several
queues, and every thread when it consumes one (``-Q loops``): :func:`thread_share`. It is a hard cap, also
while the other vendors have no work: a thread lent to a slow vendor could only be had back once its delivery
ends, seconds later.

Example::

    >>> b = Bulkhead(2, ["loops", "convertloop"])
    >>> b.enter("e1.loops", "loops"), b.enter("e2.loops", "loops")   # the second fills the share
    (False, True)
    >>> b.leave("e1.loops")                                          # one ended: take the queue again
    'loops'
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from celery import bootsteps, signals

from . import gate, transport

log = logging.getLogger(__name__)

#: Seconds between checks for counted deliveries Celery no longer knows (ended without a signal reaching us).
RECONCILE_INTERVAL = 10.0
#: A counted delivery is forgotten that way only once it is older than this many seconds.
RECONCILE_GRACE = 5.0


def thread_share(concurrency: int, queues: int, share: float) -> int:
    """The most threads one queue's deliveries may hold: ``share`` of ``concurrency`` (at least one), or all
    of them when the worker consumes one queue or ``share`` is 1.

    >>> thread_share(32, 3, 0.5), thread_share(16, 3, 0.5), thread_share(32, 1, 0.5), thread_share(32, 3, 1.0)
    (16, 8, 32, 32)
    """
    if queues <= 1 or share >= 1:
        return concurrency
    return min(concurrency, max(1, math.floor(concurrency * share)))


class Bulkhead:
    """The deliveries one worker process holds per queue, and when a queue must stop being taken.

    Thread- and greenlet-safe: :meth:`enter` runs on the consumer's thread, :meth:`leave` on delivery threads (or
    greenlets, on the gevent pool). A delivery
    is known by its task id; a task id received twice (a redelivery while the first still runs) counts twice.
    """

    def __init__(self, limit: int, queues: Iterable[str], clock: Callable[[], float] = time.monotonic) -> None:
        #: The most deliveries one queue may hold.
        self.limit = limit
        #: The queues counted (the worker's); messages from any other queue are not.
        self.queues = frozenset(queues)
        self.clock = clock
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()
        self._by_id: dict[str, list[tuple[str, float]]] = {}
        self._full: set[str] = set()

    def enter(self, task_id: str, queue: str) -> bool:
        """A delivery from ``queue`` was received. True when ``queue`` just reached its share: stop taking it."""
        if queue not in self.queues:
            return False
        with self._lock:
            self._by_id.setdefault(task_id, []).append((queue, self.clock()))
            self._held[queue] += 1
            if self._held[queue] >= self.limit and queue not in self._full:
                self._full.add(queue)
                return True
        return False

    def leave(self, task_id: str) -> str | None:
        """The delivery ``task_id`` ended: the queue that just fell below its share (take it again), else None.

        A task id not counted (another queue's, or already left) changes nothing."""
        with self._lock:
            entries = self._by_id.get(task_id)
            if not entries:
                return None
            queue, _ = entries.pop(0)
            if not entries:
                del self._by_id[task_id]
            return self._release(queue)

    def reconcile(self, known: Callable[[str], bool]) -> list[str]:
        """Forget counted deliveries older than :data:`RECONCILE_GRACE` whose task id ``known`` says the worker
        no longer has (they ended without a signal); the queues that fell below their share."""
        reopened = []
        cutoff = self.clock() - RECONCILE_GRACE
        with self._lock:
            for task_id in [t for t, entries in self._by_id.items() if entries[0][1] < cutoff and not known(t)]:
                for queue, _ in self._by_id.pop(task_id):
                    if (q := self._release(queue)) is not None:
                        reopened.append(q)
        return reopened

    def _release(self, queue: str) -> str | None:
        self._held[queue] -= 1
        if queue in self._full and self._held[queue] < self.limit:
            self._full.discard(queue)
            return queue
        return None

    def held(self, queue: str) -> int:
        """Deliveries from ``queue`` this process holds now."""
        return self._held[queue]

    def room(self, queue: str) -> int | None:
        """How many more deliveries from ``queue`` this process may take now (None: a queue not counted)."""
        if queue not in self.queues:
            return None
        return max(0, self.limit - self._held[queue])

    def full(self) -> set[str]:
        """The queues at their share now (not being taken)."""
        with self._lock:
            return set(self._full)


#: The worker process's bulkhead while its consumer runs with one (threads or gevent pool, several queues), else
#: None.
_bulkhead: Bulkhead | None = None


class BulkheadStep(bootsteps.StartStopStep):
    """Consumer bootstep: sizes the process's :class:`Bulkhead` for the queues the consumer takes, and after a
    reconnection stops again the queues still at their share (the new consumer takes every queue)."""

    requires = {"worker.broker.gate:QueueGate"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer: Any = None

    def start(self, c: Any) -> None:
        global _bulkhead
        from celery.concurrency.thread import TaskPool as ThreadPool

        from ..settings import get_settings

        queues = sorted(q.name for q in c.task_consumer.queues)
        concurrency = getattr(c.pool, "limit", None) or c.app.conf.worker_concurrency
        limit = thread_share(concurrency, len(queues), get_settings().bulkhead_share)
        in_process = isinstance(c.pool, ThreadPool) or getattr(c.pool, "is_green", False)
        if not in_process or limit >= concurrency:
            # Prefork runs tasks in other processes, where the end of a delivery cannot be counted here.
            _bulkhead = None
            return
        if _bulkhead is None or _bulkhead.limit != limit or _bulkhead.queues != frozenset(queues):
            _bulkhead = Bulkhead(limit, queues)
            log.info("bulkhead: the deliveries of each of %s hold at most %d of the %d threads",
                     ", ".join(queues), limit, concurrency)
        for queue in _bulkhead.full():
            gate.limit(queue)
        self._timer = c.timer.call_repeatedly(RECONCILE_INTERVAL, _reconcile)

    def stop(self, c: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    shutdown = stop


def _room(queue: str) -> int | None:
    b = _bulkhead
    return None if b is None else b.room(queue)


transport.add_room(_room)  # a take brings no more of a queue than its share has room for


def _reconcile() -> None:
    from celery.worker import state

    b = _bulkhead
    if b is not None:
        for queue in b.reconcile(lambda task_id: task_id in state.requests):
            gate.unlimit(queue)


@signals.task_received.connect(dispatch_uid="worker.broker.bulkhead.received")
def _received(request: Any = None, **_: Any) -> None:
    b = _bulkhead
    if b is None or request is None:
        return
    queue = (request.delivery_info or {}).get("routing_key")  # the queue's name: each queue is its routing key
    if isinstance(queue, str) and b.enter(request.id, queue):
        gate.limit(queue)


def _ended(task_id: str | None) -> None:
    b = _bulkhead
    if b is None or task_id is None:
        return
    queue = b.leave(task_id)
    if queue is not None:
        gate.unlimit(queue)


@signals.task_postrun.connect(dispatch_uid="worker.broker.bulkhead.postrun")
def _postrun(task_id: str | None = None, **_: Any) -> None:
    _ended(task_id)


@signals.task_revoked.connect(dispatch_uid="worker.broker.bulkhead.revoked")
def _revoked(request: Any = None, **_: Any) -> None:
    _ended(getattr(request, "id", None))
