"""The Celery application. ``celery -A worker worker`` finds it as ``worker.app``.

Its configuration is :mod:`worker.broker.config`; ``CELERY_CONFIG_MODULE=mymodule`` applies a deployment's
overrides on top (each lower-case name of that module is a Celery setting). The task module is imported by
the worker at start (``imports``), never by a producer.

Example::

    $ celery -A worker worker              # every vendor queue
    $ celery -A worker worker -Q loops     # Loops only
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import types

import redis
from celery import Celery, signals

from .. import metrics
from ..observability import init_sentry
from ..redisconf import RedisConfigError
from ..settings import get_settings
from .bulkhead import BulkheadStep
from .gate import QueueGate
from .green import GreenStep
from .taskevents import TaskEventBatch
from .ticker import TickerStep

log = logging.getLogger(__name__)
#: Seconds a starting worker waits for Redis (and each Sentinel) to answer its configuration check.
STARTUP_CHECK_TIMEOUT = 5.0

#: The environment variable naming a deployment's module of Celery setting overrides (optional).
OVERRIDES_ENV = "CELERY_CONFIG_MODULE"

app = Celery("worker")
app.config_from_object("worker.broker.config")


def _overrides(name: str | None) -> dict[str, object]:
    """The Celery settings (lower-case names) of the module ``name``; none without one."""
    if not name:
        return {}
    module = importlib.import_module(name)
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k.islower()
            and not isinstance(v, types.ModuleType | types.FunctionType | type)}


def _own_results(overrides: dict[str, object]) -> dict[str, object]:
    """``overrides``, with Celery's default ``result_backend_thread_safe = False`` where they choose a result
    backend without saying whether it is thread-safe (ours, none, is: worker/broker/config.py)."""
    if overrides.get("result_backend") is not None and "result_backend_thread_safe" not in overrides:
        return {**overrides, "result_backend_thread_safe": False}
    return overrides


app.conf.update(_own_results(_overrides(os.environ.get(OVERRIDES_ENV))))
app.steps["consumer"].add(QueueGate)
app.steps["consumer"].add(BulkheadStep)
app.steps["consumer"].add(TickerStep)
app.steps["consumer"].add(GreenStep)
app.steps["consumer"].add(TaskEventBatch)


@signals.celeryd_init.connect
def _start_sentry(**_: object) -> None:
    init_sentry(get_settings())


@signals.worker_init.connect
@signals.worker_process_init.connect  # a prefork child (the default pool is threads: one process)
def _start_metrics(**_: object) -> None:
    metrics.start()


#: The garbage collector's thresholds in a worker (Python's default: 700, 10, 10). Every delivery leaves a
#: few objects in reference cycles (on the gevent pool, each task's greenlet, its ``threading.local`` entries and
#: their weak references: ~10 objects), and with 700 a young collection ran every few deliveries. On a slow vendor
#: a delivery's objects outlive several of them, were promoted, and were scanned again by older collections: on
#: gevent with 100 ms latency the collector took 0.046 ms of CPU per delivery against 0.010 ms without. With
#: 20,000 that figure, and the gap, shrink (docs/pools.md has the measurements).
GC_THRESHOLDS = (20_000, 20, 20)


@signals.worker_ready.connect
@signals.worker_process_init.connect  # a prefork child
def _tune_gc(**_: object) -> None:
    """Move what start-up made out of the garbage collector's way (:func:`gc.freeze`): a full collection
    over the worker's ~100 MB of long-lived objects stalled every thread for tens of milliseconds now and then,
    long enough to make a rate-limit slot's holder wake too late for it (at 50/s, 2 % of the slots were given
    up that way). What is made after start-up is collected as before, less often (:data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


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


#: Celery's pools that need the standard library monkey-patched before anything else is imported.
GREEN_POOLS = ("gevent", "eventlet")


def _unpatched_green_pool(options: dict[str, object], configured: object) -> str | None:
    """The green pool this worker would run without its monkey-patching, else None.

    Celery patches only for a pool named on the command line (``-P gevent``), before it imports anything else;
    one chosen by the ``worker_pool`` setting alone (a ``CELERY_CONFIG_MODULE`` override) would run unpatched:
    every socket read, sleep and lock would block the whole worker.

    >>> _unpatched_green_pool({"pool_cls": None}, "threads") is None
    True
    """
    chosen = options.get("pool_cls") or configured
    name = chosen if isinstance(chosen, str) else getattr(chosen, "__module__", "")
    pool = next((p for p in GREEN_POOLS if p in str(name)), None)
    if pool == "gevent":
        from gevent import monkey

        return None if monkey.is_module_patched("socket") else pool
    if pool == "eventlet":
        import eventlet.patcher

        return None if eventlet.patcher.is_monkey_patched("socket") else pool
    return None


@signals.celeryd_init.connect
def _check_pool(conf: object = None, options: dict[str, object] | None = None, **_: object) -> None:
    """A green pool chosen without ``-P`` stops the worker at once, saying how to start it."""
    pool = _unpatched_green_pool(options or {}, getattr(conf, "worker_pool", None))
    if pool is not None:
        print(f"configuration error: the {pool} pool must be chosen on the command line (celery -A worker worker "
              f"-P {pool} -c N), not by the worker_pool setting: only then does Celery patch the standard library "
              f"for it before anything else is imported", file=sys.stderr, flush=True)
        raise SystemExit(2)


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
