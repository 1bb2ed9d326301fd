"""The producer API for asyncio handlers (FastAPI, Starlette, Django async views): ``await worker.aio.track(...)``.

The same calls as :mod:`worker.producer` — same arguments, validation
(:class:`~worker.errors.InvalidEvent`), event ids, fan-out, messages, bounded
wait (``PUBLISH_TIMEOUT``) and local spool — but they never block the event
loop, not even while Redis is down or hangs: Redis is written through
``redis.asyncio`` (:mod:`worker.producer.publisher_async`) and the spool's file write
runs in a thread.

A publish, once started, finishes (queued or spooled) even if the calling task
is cancelled — a client that disconnects cannot leave an event half-published;
the cancelled caller just never sees the id.

Example::

    >>> import worker
    >>> async def signup(request):                                              # doctest: +SKIP
    ...     await worker.aio.identify(email="jill@acme.co", traits={"first_name": "Jill"})
    ...     return {"event": await worker.aio.track("signed_up", email="jill@acme.co")}
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from .producer import api as producer
from .producer.api import Prepared
from .producer.publisher_async import AsyncPublisher

log = logging.getLogger(__name__)

#: Publishes running on after their callers were cancelled (kept referenced until done).
_orphans: set[asyncio.Task[str]] = set()


async def identify(*, email: str | None = None, user_id: str | None = None, pid: str | None = None,
                   traits: Mapping[str, Any] | None = None, vendors: Iterable[str] | None = None) -> str:
    """Create or update a person at every vendor that can carry it; see :func:`worker.identify`."""
    return await send(producer.prepare_identify(email=email, user_id=user_id, pid=pid, traits=traits,
                                                vendors=vendors))


async def track(event: str, *, email: str | None = None, user_id: str | None = None, pid: str | None = None,
                properties: Mapping[str, Any] | None = None, occurred_at: datetime | str | None = None,
                vendors: Iterable[str] | None = None) -> str:
    """Record an event on a person; see :func:`worker.track`."""
    return await send(producer.prepare_track(event, email=email, user_id=user_id, pid=pid, properties=properties,
                                             occurred_at=occurred_at, vendors=vendors))


async def segment(*, email: str | None = None, user_id: str | None = None, pid: str | None = None,
                  add: Iterable[str] = (), remove: Iterable[str] = (), vendors: Iterable[str] | None = None) -> str:
    """Add a person to segments and remove them from others; see :func:`worker.segment`."""
    return await send(producer.prepare_segment(email=email, user_id=user_id, pid=pid, add=add, remove=remove,
                                               vendors=vendors))


async def send(prepared: Prepared) -> str:
    """Publish a prepared call without blocking the loop; returns its event id (raises EnqueueError)."""
    if producer.recording is not None:  # a test recorder (worker.testing): recorded, not published
        return producer.recording.record(prepared)
    if not prepared.vendors:
        return prepared.id
    publisher = await AsyncPublisher.current()
    task = asyncio.ensure_future(publisher.publish(prepared.payload, prepared.vendors,
                                                   event_json=prepared.event_json))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            _orphans.add(task)
            task.add_done_callback(_orphan_done)
        raise
    return prepared.id


def _orphan_done(task: asyncio.Task[str]) -> None:
    _orphans.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("an event whose caller was cancelled could not be enqueued: %s", task.exception())
