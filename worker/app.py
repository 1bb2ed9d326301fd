"""The Celery application. ``celery -A worker worker`` finds it as ``worker.app``.

Example::

    $ celery -A worker worker              # every vendor queue
    $ celery -A worker worker -Q loops     # Loops only
"""

from __future__ import annotations

from celery import Celery, signals

from . import metrics
from .limits.gate import QueueGate
from .retries.ticker import TickerStep
from .observability import init_sentry
from .settings import get_settings

app = Celery("worker")
app.config_from_object("celeryconfig")
app.steps["consumer"].add(QueueGate)
app.steps["consumer"].add(TickerStep)


@signals.celeryd_init.connect
def _start_sentry(**_: object) -> None:
    init_sentry(get_settings())


@signals.worker_init.connect
@signals.worker_process_init.connect  # a prefork child (the default pool is threads: one process)
def _start_metrics(**_: object) -> None:
    metrics.start()


@signals.worker_shutdown.connect  # after the pool finished its deliveries (a warm shutdown)
@signals.worker_process_shutdown.connect
def _flush_metrics(**_: object) -> None:
    metrics.stop()
