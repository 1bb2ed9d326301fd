"""The Celery application. ``celery -A worker worker`` finds it as ``worker.app``.

Example::

    $ celery -A worker worker              # every vendor queue
    $ celery -A worker worker -Q loops     # Loops only
"""

from __future__ import annotations

import logging
import sys

import redis
from celery import Celery, signals

from . import metrics
from .limits.bulkhead import BulkheadStep
from .limits.gate import QueueGate
from .observability import init_sentry
from .redisconf import RedisConfigError
from .retries.ticker import TickerStep
from .settings import get_settings

log = logging.getLogger(__name__)
#: Seconds a starting worker waits for Redis (and each Sentinel) to answer its configuration check.
STARTUP_CHECK_TIMEOUT = 5.0

app = Celery("worker")
app.config_from_object("celeryconfig")
app.steps["consumer"].add(QueueGate)
app.steps["consumer"].add(BulkheadStep)
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


@signals.celeryd_init.connect
def _check_kombu(**_: object) -> None:
    """A worker on a kombu whose internals the transport does not know stops at once, saying what to install."""
    from .transport import check_kombu

    try:
        check_kombu()
    except RuntimeError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@signals.celeryd_init.connect
def _check_redis(**_: object) -> None:
    """A worker whose Redis configuration cannot work (unknown Sentinel master, TLS certificate refused, wrong
    password) stops at once with that reason; one whose Redis is merely away starts and keeps trying."""
    target = get_settings().redis_target()
    try:
        log.info("redis: %s", target.check(timeout=STARTUP_CHECK_TIMEOUT))
    except RedisConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except redis.RedisError as exc:
        log.warning("redis (%s) not answering yet, the worker keeps trying: %s", target.describe(), exc)
