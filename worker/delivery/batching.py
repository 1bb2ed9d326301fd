"""Several deliveries to one vendor in one request: the per-process batcher.

Each delivery task hands its event to the vendor's :class:`Batcher` and blocks
until it gets its own :class:`Sent` back; the task then settles it (delivered,
retry, dead letter) exactly as it would a request of its own, so retries, dead
letters and acknowledgements stay per event, and a crash before the request
leaves loses nothing (the messages are not acknowledged yet).

The first waiting task *leads* the next batch:

1. it waits up to ``max_wait`` after the batch's first event, or until ``size``
   events are waiting;
2. it takes ONE token from the vendor's limiter, reserving at most ``horizon``
   seconds ahead; more events join while it waits for that moment;
3. it sends up to ``size`` events as one request (the next waiting event leads
   the next batch meanwhile) and hands every event its outcome.

An event the vendor refuses because of *other* events is :attr:`Verdict.RESEND`:
the leader sends those again as one request, or, when the vendor said nothing
about which items were bad, in two halves, down to single events, whose answer
is exact. Every further request takes its own token. When no token is to be had
within ``horizon``, every waiting event gets :class:`~worker.throttle.Throttled`:
its task puts the message back on the queue, no attempt used.

Example::

    >>> from worker.limits.ratelimit import Unlimited
    >>> send = lambda items: [Sent(Outcome(Verdict.DELIVERED, 200), batch=len(items)) for _ in items]
    >>> b = Batcher("demo", Unlimited(), send, size=10, max_wait=0.0)
    >>> b.submit("e1").outcome.verdict
    <Verdict.DELIVERED: 'delivered'>
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Generic, TypeVar

from ..limits.ratelimit import RateLimiter, Reservation
from ..limits.throttle import DEFAULT_HORIZON, MAX_LATE_RETAKES, Throttled
from ..vendors.base import Outcome, Verdict

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Sent:
    """What became of one item of a request."""

    outcome: Outcome
    #: The vendor's response text, if there was a response.
    body: str | None = None
    #: A transport error instead of a response (then ``outcome`` is RETRY or REJECTED).
    error: str | None = None
    #: How many items the request carried, and this item's place in it.
    batch: int = 1
    index: int = 0
    #: Seconds the exchange took.
    elapsed: float = 0.0
    #: The vendor refused the credentials (401/403) and is paused for it: the item goes back to its queue.
    paused: bool = False


#: Sends items as one request (after a token was taken) and returns one :class:`Sent` per item, in order.
SendFn = Callable[[Sequence[T]], Sequence[Sent]]


class BatchError(Exception):
    """The batch an item was in failed unexpectedly (the cause is chained)."""


class _Slot(Generic[T]):
    """One waiting item; ``wake`` is set when it is settled or made leader."""

    __slots__ = ("item", "arrived", "wake", "leads", "result", "error")

    def __init__(self, item: T) -> None:
        self.item = item
        self.arrived = time.monotonic()
        self.wake = threading.Event()
        self.leads = False
        self.result: Sent | None = None
        self.error: BaseException | None = None

    @property
    def settled(self) -> bool:
        return self.result is not None or self.error is not None

    def settle(self, result: Sent) -> None:
        self.result = result
        self.wake.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.wake.set()


class Batcher(Generic[T]):
    """Gathers items submitted by many threads into requests of at most ``size`` items."""

    def __init__(
        self,
        vendor: str,
        limiter: RateLimiter,
        send: SendFn,
        size: int,
        max_wait: float,
        horizon: float = DEFAULT_HORIZON,
        sleep: Callable[[float], None] = time.sleep,
        deadline: float = float("inf"),
    ) -> None:
        if size < 1 or max_wait < 0 or horizon < 0:
            raise ValueError("size must be >= 1, max_wait and horizon >= 0")
        self.vendor = vendor
        self.limiter = limiter
        self.send = send
        self.size = size
        self.max_wait = max_wait
        self.horizon = horizon
        self.sleep = sleep
        #: Seconds a batch may spend sending (its splits included): past it, what is left goes back to the queue
        #: (Throttled), so no message is held past the visibility timeout.
        self.deadline = deadline
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._pending: deque[_Slot[T]] = deque()
        self._leader: _Slot[T] | None = None

    def waiting(self) -> int:
        """Items waiting for a batch to take them."""
        with self._lock:
            return len(self._pending)

    def submit(self, item: T) -> Sent:
        """Send ``item`` in the next batch and return its outcome; raise :class:`Throttled` if no token is near."""
        slot: _Slot[T] = _Slot(item)
        with self._lock:
            self._pending.append(slot)
            if self._leader is None:
                self._appoint(slot)
            elif len(self._pending) >= self.size:
                self._more.notify()
        slot.wake.wait()
        if slot.leads:
            self._lead(slot)
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    # -- the leader's work ------------------------------------------------------

    def _appoint(self, slot: _Slot[T]) -> None:
        """Under the lock: ``slot`` (the oldest waiting item) leads the next batch."""
        self._leader = slot
        slot.leads = True
        slot.wake.set()

    def _lead(self, me: _Slot[T]) -> None:
        taken: list[_Slot[T]] = []
        try:
            self._gather()
            reservation = self._token()  # more items join while it waits for its slot
            if not reservation.granted:
                taken = self._take(everything=True)
                for slot in taken:
                    slot.fail(Throttled(self.vendor, reservation.wait))
                return
            taken = self._take()
            self._resolve(taken)
        except BaseException as exc:
            if not taken:
                taken = self._take()
            for slot in taken:
                if not slot.settled:
                    error = BatchError(f"{self.vendor}: batch failed: {type(exc).__name__}: {exc}")
                    error.__cause__ = exc
                    slot.fail(error)
            log.exception("%s: batch of %s failed", self.vendor, len(taken))
        finally:
            if not me.settled:  # cannot happen: the leader is the oldest item, so it is always taken
                me.fail(BatchError(f"{self.vendor}: batch leader was not in its batch"))

    def _token(self) -> Reservation:
        """Sleep until a slot of the limiter is this batch's, admitted on Redis' clock (a slot revoked
        or woken too late for is given up, another taken); or the refusal (not granted: the next slot
        is further than ``horizon``)."""
        late = 0
        for _ in range(MAX_LATE_RETAKES + 8):
            reservation = self.limiter.acquire(max_wait=self.horizon)
            if not reservation.granted:
                return reservation
            admission = self.limiter.hold(reservation, self.sleep, strict=late < MAX_LATE_RETAKES)
            if admission.admitted:
                return reservation
            late += admission.why == "late"
        return Reservation(False, self.horizon)

    def _gather(self) -> None:
        """Wait until ``size`` items wait or ``max_wait`` has passed since the oldest arrived."""
        with self._lock:
            deadline = self._pending[0].arrived + self.max_wait
            while len(self._pending) < self.size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._more.wait(left)

    def _take(self, everything: bool = False) -> list[_Slot[T]]:
        """Remove the next batch from the queue and hand the lead to the next waiting item."""
        with self._lock:
            n = len(self._pending) if everything else min(self.size, len(self._pending))
            taken = [self._pending.popleft() for _ in range(n)]
            self._leader = None
            if self._pending:
                self._appoint(self._pending[0])
        return taken

    def _resolve(self, slots: list[_Slot[T]]) -> None:
        """Send ``slots`` (a token is already held for the first request) until each has its outcome."""
        groups: deque[list[_Slot[T]]] = deque([slots])
        have_token = True
        started = time.monotonic()
        while groups:
            group = groups.popleft()
            if not have_token and time.monotonic() - started > self.deadline:
                log.warning("%s: a refused bulk request's split ran past %.0fs: %s item(s) go back to the queue",
                            self.vendor, self.deadline, sum(len(g) for g in (group, *groups)))
                for slot in chain(group, *groups):
                    slot.fail(Throttled(self.vendor, 0.0))
                return
            if not have_token:
                reservation = self._token()
                if not reservation.granted:
                    for slot in chain(group, *groups):
                        slot.fail(Throttled(self.vendor, reservation.wait))
                    return
            have_token = False
            results = list(self.send([slot.item for slot in group]))
            if len(results) != len(group):
                raise RuntimeError(f"{self.vendor}: {len(results)} outcomes for {len(group)} items")
            again = []
            for slot, result in zip(group, results, strict=True):
                if result.outcome.verdict is Verdict.RESEND and len(group) > 1:
                    again.append(slot)
                else:
                    slot.settle(result)
            if not again:
                continue
            if len(again) < len(group):  # the vendor named the bad items: the rest go again together
                groups.appendleft(again)
            else:  # it did not say which: halve until it does (a single item's answer is exact)
                half = len(again) // 2
                groups.appendleft(again[half:])
                groups.appendleft(again[:half])
            log.info("%s: bulk request of %s refused, sending %s item(s) again", self.vendor, len(group), len(again))
