"""The producer side: what a web process runs for ``worker.identify / track / segment``.

``api`` validates a call and fans it out to the vendors that can carry it; ``publisher`` queues the messages
(:mod:`worker.envelope`) in one write to Redis, bounded by ``PUBLISH_TIMEOUT``; ``spool`` keeps them on disk
while Redis is away; ``publisher_async`` is the same for asyncio (:mod:`worker.aio`). Nothing here imports
Celery, the HTTP client or the worker's side.

Example::

    >>> from worker.producer import api
    >>> api.track("signed_up", email="jill@acme.co")   # doctest: +SKIP
    '5f0c6c1e4a1b4a8e9d7c2b1a0f9e8d7c'
"""
