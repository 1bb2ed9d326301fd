"""Delivering one message: vendor-agnostic, Celery-free.

``pipeline`` runs an attempt (property cap -> person's turn -> rate limit -> HTTP -> classify -> retry or
dead letter); ``ordering`` keeps each person's calls in order at each vendor and merges waiting updates;
``batching`` carries a vendor's bulk requests; ``deadletters`` stores what failed for good. It uses
:mod:`worker.limits`, :mod:`worker.retries`, :mod:`worker.metrics` and
the pure :mod:`worker.vendors`; the broker (:mod:`worker.broker`) calls it.

Example::

    >>> from worker.delivery.pipeline import Pipeline
    >>> Pipeline.default().deliver("loops", event, attempt=1, task_id="e1.loops")   # doctest: +SKIP
    Delivered(vendor='loops', status=200, attempt=1, elapsed=0.031)
"""
