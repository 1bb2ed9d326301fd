"""Deliver identify / track / segment calls to ConvertLoop, Loops and ConveYour.

The flow, top-down, one module each:

    producer  -> validate, fan out to vendors, enqueue (this API)
    tasks     -> the thin Celery task ``worker.deliver``
    pipeline  -> cap -> limiter -> send -> classify -> retry / dead-letter
    vendors/  -> one pure module per vendor: build requests, classify responses

Example::

    >>> import worker
    >>> worker.track("made_sale", email="jill@acme.co", properties={"amount": 1000})  # doctest: +SKIP
    '5f0c6c1e4a1b4a8e9d7c2b1a0f9e8d7c'
"""

from . import tasks  # noqa: F401  (registers worker.deliver)
from .app import app
from .errors import DeadLettered, EnqueueError, InvalidEvent
from .producer import identify, segment, track

__all__ = ["app", "identify", "track", "segment", "InvalidEvent", "DeadLettered", "EnqueueError"]
