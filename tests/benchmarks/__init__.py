"""Benchmarks: ``make bench`` (full sizes) or ``python -m tests.benchmarks [--smoke] [--json PATH] [--only ...]``.

Not pytest tests (no ``test_*.py`` here): each figure starts what it needs — a private
Redis, the vendor sandbox in its own process, worker processes — measures the product
and its baseline side by side in the same run, and reports one table (``stack.Row``).
Targets are checked by reading the output, never by timed assertions.

Figure groups, one module each: ``enqueue``, ``outage``, ``throughput``, ``ratelimit``, ``memory``,
``batching``; ``stack`` has what they share, ``noop`` the baseline Celery task, ``readme``
the docs' Performance table (docs/performance.md) a full run writes.
"""
