"""Deliver identify / track / segment calls to ConvertLoop, Loops and ConveYour.

The flow, top-down, one subpackage each (``docs/architecture.md``):

    producer/  -> validate, fan out to vendors, enqueue (this API; no Celery imported)
    broker/    -> the Celery app, the thin task ``worker.deliver``, its transport and bootsteps
    delivery/  -> pipeline: cap -> order -> limiter -> send -> classify -> retry / dead-letter
    vendors/   -> one pure module per vendor: build requests, classify responses

``import worker`` loads only what a producer needs; ``worker.app`` (the Celery app ``celery -A worker``
finds) and ``worker.aio`` are imported when first used.

Example::

    >>> import worker
    >>> worker.track("made_sale", email="jill@acme.co", properties={"amount": 1000})  # doctest: +SKIP
    '5f0c6c1e4a1b4a8e9d7c2b1a0f9e8d7c'
    >>> await worker.aio.track("made_sale", email="jill@acme.co")   # in an asyncio handler  # doctest: +SKIP
    '9a1e0d4c3b2a4f5e8d7c6b5a4f3e2d1c'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, DeadLettered, EnqueueError, InvalidEvent
from .producer.api import check_configuration, identify, segment, track

if TYPE_CHECKING:
    from celery import Celery

    from . import aio

    app: Celery

__all__ = ["app", "identify", "track", "segment", "aio", "check_configuration", "InvalidEvent", "DeadLettered",
           "EnqueueError", "ConfigurationError"]

#: Public names imported on first use: the Celery app (a worker's, or Flower's) and the asyncio API.
_LAZY = {"app": ("worker.broker.app", "app"), "aio": ("worker.aio", None)}


def __getattr__(name: str) -> Any:
    """``worker.app`` and ``worker.aio``, imported when first asked for (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    return getattr(value, attribute) if attribute else value
