"""Enqueue latency: ``worker.track()`` to all three vendors vs redis-py LPUSHing the same messages.

All three kinds run in this process against the same private Redis, interleaved in
blocks (the order rotates every round) after a warm-up of each, so that noise
from the machine falls on all alike. No worker runs: messages pile up and are
flushed afterwards. The whole measurement is repeated ``Sizes.repeats`` times;
the rows show the median p50 / p99 of the runs with their range.

- ours: ``worker.track("bench_event", email=..., properties={...})``, every vendor enabled.
- baseline: the fastest honest equivalent with redis-py's general API — the three
  messages the product wrote for one such call (same bytes, same queues' sizes),
  ``Redis.lpush``-ed through one ``pipeline(transaction=False)``: one round trip, as
  the product's hand-packed write (``worker/producer/publisher.py``) makes.
- reference: ``noop.delay()`` — plain Celery publishing of a no-op task.

Example::

    python -m tests.benchmarks --only enqueue
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from worker.dev.localstack import wait_until

from .stack import BenchError, BenchStack, Row, Sizes, percentile

GROUP = "enqueue"
#: The baseline pushes onto its own keys (``bench:baseline:<vendor>``) so the vendor queues count only ours.
BASELINE_PREFIX = "bench:baseline:"


def product_messages(stack: BenchStack, make: Callable[[], Any]) -> list[tuple[str, bytes]]:
    """Call the producer once and take the (queue, bytes) it wrote to every vendor queue off again."""
    from worker.vendors import VENDORS

    stack.r.delete(*VENDORS)
    make()
    wait_until(lambda: all(stack.r.llen(v) for v in VENDORS), timeout=10, message="one message per vendor")
    out = [(v, stack.r.rpop(v)) for v in VENDORS]
    if any(m is None for _, m in out) or any(stack.r.llen(v) for v in VENDORS):
        raise BenchError(f"enqueue: expected exactly one message per vendor, got {out}")
    return out


def measure_once(sizes: Sizes, kinds: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
    """One interleaved run: every kind ``enqueue_calls`` times; sorted latencies in µs per kind."""
    samples: dict[str, list[int]] = {k: [] for k in kinds}
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
    return {k: sorted(v / 1000 for v in vals) for k, vals in samples.items()}


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    import worker
    from worker.vendors import VENDORS

    from .noop import noop

    stack.clean()
    properties = {"plan": "pro", "amount": 1000, "currency": "EUR", "coupon": None}
    messages = product_messages(
        stack, lambda: worker.track("bench_event", email="bench@example.com", properties=properties))
    baseline_messages = [(BASELINE_PREFIX + q, m) for q, m in messages]
    # The product also writes each call's place in its person's order (worker/delivery/ordering.py: an RPUSH and an HSET
    # per vendor, in one MULTI with the messages): the baseline writes the same, so both do the same work.
    baseline_order = [("RPUSH", f"{BASELINE_PREFIX}order:{q}", f"id.{q}", "HSET", f"{BASELINE_PREFIX}order:{q}:ev",
                       f"id.{q}", m.decode()[:200]) for q, m in messages]
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    counter = iter(range(10**9))

    def call_track() -> Any:
        return worker.track("bench_event", email=f"u{next(counter)}@example.com", properties=properties)

    def call_lpush() -> Any:
        # Why a MULTI of three LPUSHes (and the three calls' places in their person's order) and not one LPUSH
        # of the event: the product's promise is one round trip carrying every vendor's full Celery message.
        # One LPUSH of the bare event would do a third of the commands and bytes (a flattering baseline for
        # nobody); three separate round trips would be slower than any sane implementation (flattering us).
        # redis-py's general command packer is used, not the product's hand-packed bytes (publisher.wire).
        pipe = client.pipeline(transaction=True)
        for queue, message in baseline_messages:
            pipe.lpush(queue, message)
        for rpush, key, task, hset, events, field, event in baseline_order:
            pipe.execute_command(rpush, key, task)
            pipe.execute_command(hset, events, field, event)
        return pipe.execute()

    def call_delay() -> Any:
        return noop.delay()

    kinds = {"track": call_track, "lpush": call_lpush, "delay": call_delay}
    for fn in kinds.values():  # warm up: connections, pools, code paths
        for _ in range(sizes.enqueue_warmup):
            fn()

    stack.say(f"enqueue: {sizes.repeats} x {sizes.enqueue_calls} calls each of track / redis-py MULTI of the same "
              f"writes / delay, interleaved in blocks of {sizes.enqueue_block}")
    runs: list[dict[str, dict[str, float]]] = []
    for i in range(sizes.repeats):
        us = measure_once(sizes, kinds)
        runs.append({k: {"p50_us": percentile(v, 50), "p99_us": percentile(v, 99), "mean_us": sum(v) / len(v),
                         "max_us": v[-1], "calls": len(v)} for k, v in us.items()})
        stack.say(f"  run {i + 1}: p50 track {runs[-1]['track']['p50_us']:.0f} µs, lpush "
                  f"{runs[-1]['lpush']['p50_us']:.0f} µs, delay {runs[-1]['delay']['p50_us']:.0f} µs")

    # Everything that was enqueued is really there (the producer may publish asynchronously).
    calls = sizes.enqueue_warmup + sizes.enqueue_calls * sizes.repeats
    expected = calls * len(VENDORS) + calls  # track to every vendor + the no-op on convertloop

    def queued() -> int:
        pipe = stack.r.pipeline(transaction=False)
        for v in VENDORS:
            pipe.llen(v)
        return sum(pipe.execute())

    wait_until(lambda: queued() >= expected, timeout=30, message=f"{expected} messages on the vendor queues")
    got, base_got = queued(), sum(stack.r.llen(q) for q, _ in baseline_messages)
    if got != expected or base_got != calls * len(VENDORS):
        raise BenchError(f"enqueue: {got} messages on the vendor queues, expected {expected}; "
                         f"{base_got} baseline messages, expected {calls * len(VENDORS)}")
    stack.r.flushdb()

    def values(kind: str, q: str) -> list[float]:
        return [r[kind][q] for r in runs]

    n = sizes.enqueue_calls
    base = "redis-py MULTI of the same writes (LPUSH x3 + each call's place in its order)"
    return [
        Row.repeated(f"enqueue p50: track() 3 vendors vs {base}", values("track", "p50_us"),
                     values("lpush", "p50_us"), "µs", at_most=2.0, calls=n, runs=runs),
        Row.repeated(f"enqueue p99: track() 3 vendors vs {base}", values("track", "p99_us"),
                     values("lpush", "p99_us"), "µs", at_most=3.0, calls=n),
        Row.repeated(f"enqueue p50: Celery .delay() no-op vs {base} (reference)", values("delay", "p50_us"),
                     values("lpush", "p50_us"), "µs", calls=n),
        Row.repeated(f"enqueue p99: Celery .delay() no-op vs {base} (reference)", values("delay", "p99_us"),
                     values("lpush", "p99_us"), "µs", calls=n),
    ]
