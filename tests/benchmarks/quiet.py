"""Diagnostic only: a worker started with ``--include tests.benchmarks.quiet`` skips per-delivery INFO lines.

Silences httpx's "HTTP Request" line, the pipeline's "delivered" line and Celery's
"received"/"succeeded" lines (loggers set to WARNING), to measure what per-delivery
logging costs. The worker still logs " ready." (the harness waits for it).
"""

from __future__ import annotations

import logging

from celery import signals

QUIET = ("httpx", "worker.delivery.pipeline", "celery.app.trace", "celery.worker.strategy")


def _quiet(**_: object) -> None:
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


_quiet()
signals.after_setup_logger.connect(_quiet, weak=False)
signals.worker_init.connect(_quiet, weak=False)
