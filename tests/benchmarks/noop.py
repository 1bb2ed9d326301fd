"""The baseline task: a Celery no-op on the product's own app, config and queues.

A worker runs it when started with ``--include tests.benchmarks.noop``; it is routed
to the ``convertloop`` queue so it is drained by the same transport, pool and
concurrency as real deliveries.

Example::

    >>> from tests.benchmarks.noop import noop
    >>> noop.delay()  # doctest: +SKIP
"""

from __future__ import annotations

from worker.broker.app import app

#: Queue the no-op tasks go to (one of the product's queues: task_create_missing_queues is off).
NOOP_QUEUE = "convertloop"


@app.task(name="bench.noop", queue=NOOP_QUEUE, acks_late=True, ignore_result=True)
def noop(*args: object, **kwargs: object) -> None:
    return None
