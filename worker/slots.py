"""A bounded pool of reusable slots: an object checked out for one piece of work and given back after it.

The worker's HTTP transport keeps its keep-alive connections this way (:class:`worker.clients.VendorHTTP`,
one pool of slots per vendor host): a delivery takes a connection for one exchange and gives it back when the
response is closed, so the next delivery reuses its open connection. Unlike a ``threading.local`` per thread,
this does not depend on what runs the deliveries: Celery's threads pool keeps its threads, but its gevent pool
runs every task in a new greenlet (a greenlet-local object would be made for every task and never closed).

- A slot is made (``make``) only when none is idle: the slots in existence are the most ever used at once.
- :meth:`Slots.take` hands out the most recently given back slot first (its connection is the warmest); the
  ones left idle longest are the first to be closed by the vendor, and are reused last.
- At most ``keep`` slots stay idle: one given back beyond that is closed (``close``) at once.
- Thread-safe, and greenlet-safe under gevent's monkey-patching (its lock is then gevent's; nothing here
  blocks while holding it: ``make`` and ``close`` run outside the lock).

Example::

    >>> made = []
    >>> slots = Slots(lambda: made.append(len(made)) or len(made) - 1, close=lambda s: None, keep=1)
    >>> with slots.slot() as a:
    ...     with slots.slot() as b:
    ...         (a, b)
    (0, 1)
    >>> slots.idle(), slots.out(), len(made)   # b came back first and stays; a found no room: closed
    (1, 0, 2)
    >>> with slots.slot() as c:
    ...     c                                      # the idle one is reused, nothing made
    1
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Slots(Generic[T]):
    """Reusable slots made by ``make``, at most ``keep`` of them idle, closed by ``close``."""

    def __init__(self, make: Callable[[], T], close: Callable[[T], object], keep: int) -> None:
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self._make = make
        self._close = close
        self.keep = keep
        self._lock = threading.Lock()
        self._idle: list[T] = []
        self._out = 0
        self._closed = False

    def take(self) -> T:
        """An idle slot (the one given back last), or a new one when none is idle."""
        with self._lock:
            if self._closed:
                raise RuntimeError("these slots are closed")
            self._out += 1
            if self._idle:
                return self._idle.pop()
        try:
            return self._make()
        except BaseException:
            with self._lock:
                self._out -= 1
            raise

    def give(self, item: T, broken: bool = False) -> None:
        """Give back a slot taken with :meth:`take`; ``broken``: close it instead of keeping it."""
        with self._lock:
            self._out -= 1
            keep = not broken and not self._closed and len(self._idle) < self.keep
            if keep:
                self._idle.append(item)
        if not keep:
            self._close(item)

    @contextmanager
    def slot(self) -> Iterator[T]:
        """A slot for the ``with`` block, given back after it (closed when the block raised)."""
        item = self.take()
        ok = False
        try:
            yield item
            ok = True
        finally:
            self.give(item, broken=not ok)

    def idle(self) -> int:
        """Slots waiting to be taken."""
        with self._lock:
            return len(self._idle)

    def out(self) -> int:
        """Slots taken and not given back yet."""
        with self._lock:
            return self._out

    def close(self) -> None:
        """Close every idle slot; a slot still out is closed when it is given back. No slot is taken after."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for item in idle:
            self._close(item)
