"""Everything that imports Celery or kombu: the app, its configuration, the task and the consumer's parts.

``app`` (``celery -A worker``) with ``config``; ``tasks`` (the thin ``worker.deliver``) and ``attempt``
(one attempt of a taken message, shared with the breaker's ``probe``); ``transport`` (kombu's Redis
transport, taking a message atomically); the bootsteps ``gate`` (stop/start taking a queue), ``bulkhead``
(a vendor's share of the threads) and ``ticker`` (due retries, probes, parked people).

Example::

    $ celery -A worker worker -Q loops
"""
