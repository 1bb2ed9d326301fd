"""Diagnostic only: a worker started with ``--include tests.benchmarks.stockevents`` publishes task events as
Celery does by itself, without :class:`worker.broker.taskevents.TaskEventBatch`.

On the threads pool Celery publishes its buffer of task events every turn of its event loop: about one
``PUBLISH`` per event, each through a new redis-py client. The ``throughput`` group runs no-op tasks and
deliveries that way too, to show what the batch saves (and what the no-op baseline was before it).

Example::

    celery -A worker worker -Q convertloop --include tests.benchmarks.stockevents
"""

from __future__ import annotations

from worker.broker.app import app
from worker.broker.taskevents import TaskEventBatch

app.steps["consumer"].discard(TaskEventBatch)
