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
    >>> await worker.aio.track("made_sale", email="jill@acme.co")   # in an asyncio handler  # doctest: +SKIP
    '9a1e0d4c3b2a4f5e8d7c6b5a4f3e2d1c'
"""

from . import aio, tasks  # noqa: F401  (tasks registers worker.deliver)
from .app import app
from .errors import ConfigurationError, DeadLettered, EnqueueError, InvalidEvent
from .producer import check_configuration, identify, segment, track

__all__ = ["app", "identify", "track", "segment", "aio", "check_configuration", "InvalidEvent", "DeadLettered",
           "EnqueueError", "ConfigurationError"]
