"""Enqueue latency: ``worker.track()`` to all three vendors vs a raw LPUSH vs Celery ``.delay()``.

All three run in this process against the same private Redis, interleaved in
blocks (the order rotates every round) after a warm-up of each, so that noise
from the machine falls on all three alike. No worker runs: messages pile up
and are flushed afterwards.

- ours: ``worker.track("bench_event", email=..., properties={...})``, every vendor enabled.
- baseline: ``redis.Redis.lpush(key, json.dumps(event))`` of the same event JSON
  (the serialisation is inside the timed call; it is a few microseconds).
- reference: ``noop.delay()`` — plain Celery publishing of a no-op task.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import redis

from .stack import BenchError, BenchStack, Row, Sizes, percentile

GROUP = "enqueue"
RAW_KEY = "bench:raw-lpush"


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    import worker
    from worker.vendors import VENDORS

    from .noop import noop

    stack.clean()
    properties = {"plan": "pro", "amount": 1000, "currency": "EUR", "coupon": None}
    template = stack.template(
        lambda: worker.track("bench_event", email="bench@example.com", properties=properties), "convertloop")
    event = json.loads(base64.b64decode(template["body"]))[0][1]
    raw = redis.Redis.from_url(stack.env["REDIS_URL"])

    counter = iter(range(10**9))

    def call_track() -> Any:
        return worker.track("bench_event", email=f"u{next(counter)}@example.com", properties=properties)

    def call_lpush() -> Any:
        return raw.lpush(RAW_KEY, json.dumps(event))

    def call_delay() -> Any:
        return noop.delay()

    kinds = {"track": call_track, "lpush": call_lpush, "delay": call_delay}
    samples: dict[str, list[int]] = {k: [] for k in kinds}
    for fn in kinds.values():  # warm up: connections, pools, code paths
        for _ in range(sizes.enqueue_warmup):
            fn()

    stack.say(f"enqueue: {sizes.enqueue_calls} calls each of track / lpush / delay, interleaved "
              f"in blocks of {sizes.enqueue_block}")
    order = list(kinds)
    done = 0
    clock = time.perf_counter_ns
    while done < sizes.enqueue_calls:
        block = min(sizes.enqueue_block, sizes.enqueue_calls - done)
        for kind in order:
            fn, out = kinds[kind], samples[kind]
            for _ in range(block):
                t0 = clock()
                fn()
                out.append(clock() - t0)
        order = order[1:] + order[:1]
        done += block

    # Everything that was enqueued is really there (the producer may publish asynchronously).
    vendors = [v for v in VENDORS]
    # ... plus what the template call left on the other vendors' queues
    expected_track = (sizes.enqueue_warmup + sizes.enqueue_calls) * len(vendors) + len(vendors) - 1
    expected_noop = sizes.enqueue_warmup + sizes.enqueue_calls

    def queued() -> int:
        pipe = stack.r.pipeline(transaction=False)
        for v in vendors:
            pipe.llen(v)
        return sum(pipe.execute())

    deadline = time.monotonic() + 30
    while queued() < expected_track + expected_noop and time.monotonic() < deadline:
        time.sleep(0.1)
    got = queued()
    if got != expected_track + expected_noop:
        raise BenchError(f"enqueue: {got} messages on the vendor queues, expected {expected_track + expected_noop}")
    stack.r.flushdb()

    us = {k: sorted(v / 1000 for v in vals) for k, vals in samples.items()}
    p = {k: {q: percentile(v, q) for q in (50, 99)} for k, v in us.items()}
    details = {k: {"p50_us": p[k][50], "p99_us": p[k][99], "mean_us": sum(v) / len(v), "max_us": v[-1],
                   "calls": len(v)} for k, v in us.items()}
    n = sizes.enqueue_calls
    return [
        Row.compare("enqueue p50: track() 3 vendors vs raw LPUSH", p["track"][50], p["lpush"][50], "µs",
                    at_most=2.0, calls=n, **{"all": details}),
        Row.compare("enqueue p99: track() 3 vendors vs raw LPUSH", p["track"][99], p["lpush"][99], "µs",
                    at_most=3.0, calls=n),
        Row.compare("enqueue p50: Celery .delay() no-op vs raw LPUSH (reference)", p["delay"][50],
                    p["lpush"][50], "µs", calls=n),
        Row.compare("enqueue p99: Celery .delay() no-op vs raw LPUSH (reference)", p["delay"][99],
                    p["lpush"][99], "µs", calls=n),
    ]
