"""Prometheus metrics: what the pipeline records, and the process's flusher.

The pipeline calls :func:`record` when a delivery attempt ends (delivered,
retried, dead-lettered with its reason) and :func:`request` after each HTTP
exchange with a vendor (its duration; a 429 counts as rate limited). Both only
add to this process's in-memory counts (:class:`~worker.metrics.collect.Recorder`);
a worker process runs a flusher thread (:func:`start`, from a Celery signal in
:mod:`worker.app`) that adds them to Redis about once a second, and
:func:`stop` flushes the rest on a clean shutdown. ``python -m worker metrics``
(:mod:`worker.ops.export`) serves the totals and the live gauges to Prometheus.

Example::

    >>> from worker import metrics
    >>> metrics.record("loops", metrics.DELIVERED)
    >>> metrics.request("loops", 0.12, status=200)
    >>> metrics.start()   # in a worker process: flush every METRICS_FLUSH_INTERVAL  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading

from .collect import Flusher, Recorder
from .schema import DEAD_LETTERED, DELIVERED, MERGED, RETRIED

__all__ = ["DEAD_LETTERED", "DELIVERED", "MERGED", "RECORDER", "RETRIED", "record", "request", "start", "stop"]

#: This process's counts since its last flush.
RECORDER = Recorder()

_lock = threading.Lock()
_flusher: Flusher | None = None
_flusher_pid: int | None = None


def record(vendor: str, outcome: str, reason: str | None = None) -> None:
    """A delivery attempt to ``vendor`` ended with ``outcome`` (DELIVERED, RETRIED, DEAD_LETTERED + ``reason``)."""
    RECORDER.record(vendor, outcome, reason)


def request(vendor: str, seconds: float, status: int | None) -> None:
    """An HTTP exchange with ``vendor`` took ``seconds`` and got ``status`` (None: no answer)."""
    RECORDER.request(vendor, seconds, status)


def start() -> bool:
    """Start this process's flusher (once per process); False when ``METRICS_ENABLED`` is off."""
    global _flusher, _flusher_pid
    from .. import clients
    from ..settings import get_settings

    s = get_settings()
    RECORDER.enabled = s.metrics_enabled
    if not s.metrics_enabled:
        return False
    with _lock:
        if _flusher_pid == os.getpid() and _flusher is not None and _flusher.is_alive():
            return True
        if _flusher_pid is not None:  # a forked child: the parent flushes what it had counted
            RECORDER.take()
        _flusher = Flusher(RECORDER, clients.redis_client, s.key_prefix, s.metrics_flush_interval)
        _flusher_pid = os.getpid()
        _flusher.start()
    return True


def stop() -> bool:
    """Stop the flusher and flush what is left (a clean shutdown); True if nothing is left unflushed."""
    global _flusher
    with _lock:
        flusher, _flusher = _flusher, None
    if flusher is None or _flusher_pid != os.getpid():
        return True
    return flusher.stop()
