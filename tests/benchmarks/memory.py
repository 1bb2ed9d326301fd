"""Worker memory while a large backlog drains slowly under a rate limit.

A backlog of N track events for ConvertLoop is preloaded, then one worker process
starts (``-Q convertloop``, ``CONVERTLOOP_RATE_LIMIT=10``): with a limit most of the
backlog stays queued for a long time, and a worker that pulled it into memory,
or kept something per throttled requeue, would grow. The worker's RSS (its
process and any children, from /proc) is sampled every 0.5 s for ``memory_seconds``
— not to completion (100 000 events at 10/s would take almost three hours).

Reported: peak RSS, and the mean of the last third of the samples against the
first third (growth). Afterwards nothing may be lost: delivered + still queued +
unacked must cover the backlog.
"""

from __future__ import annotations

import time

from .stack import BenchError, BenchStack, Row, Sizes, rss_bytes

GROUP = "memory"
QUEUE = "convertloop"
MB = 1024 * 1024


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    import worker

    n, seconds = sizes.memory_backlog, sizes.memory_seconds
    stack.clean()
    template = stack.template(
        lambda: worker.track("bench_event", email="m@example.com", properties={"plan": "pro", "amount": 1},
                             vendors=[QUEUE]), QUEUE)
    stack.preload(template, QUEUE, n, vary=lambda i, e: e["identity"].update(email=f"m{i}@example.com"))
    stack.say(f"memory: {n:,} backlog preloaded; one worker at {sizes.memory_rate:g}/s, sampling RSS for {seconds:g}s")
    (proc,) = stack.workers(1, QUEUE, name="mem", CONVERTLOOP_RATE_LIMIT=sizes.memory_rate)
    pid = proc.proc.pid
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        samples.append((time.monotonic() - t0, rss_bytes(pid)))
        time.sleep(0.5)
    stack.stop_workers()
    delivered = stack.vendor_stats(QUEUE).get("200", 0)
    stack.check_clean(QUEUE)
    left = stack.r.llen(QUEUE) + stack.r.hlen("unacked")
    if delivered + left < n:
        raise BenchError(f"memory: {n} preloaded, {delivered} delivered, {left} left: {n - delivered - left} lost")

    values = [v for _, v in samples if v]
    if len(values) < 3:
        raise BenchError("memory: too few RSS samples")
    third = max(1, len(values) // 3)
    first, last = sum(values[:third]) / third / MB, sum(values[-third:]) / third / MB
    peak = max(values) / MB
    minutes = (samples[-1][0] - samples[0][0]) / 60 or 1
    rate = delivered / seconds
    stack.stop_workers()
    notes = (f"{n:,} backlog, sampled {seconds:g}s (not drained to completion): {delivered:,} delivered "
             f"({rate:.1f}/s), {left:,} still queued")
    details = {"backlog": n, "seconds": seconds, "delivered": delivered, "left": left,
               "first_third_mb": round(first, 1), "last_third_mb": round(last, 1),
               "slope_mb_per_min": round((last - first) / minutes, 2),
               "samples_mb": [(round(t, 1), round(v / MB, 1)) for t, v in samples]}
    peak_row = Row("worker peak RSS, backlog draining at 10/s", peak, None, "MB", "<= 150 MB", None,
                   peak <= 150, notes, details)
    growth = Row.compare("worker RSS growth: mean of last third vs first third of the samples", last, first, "MB",
                         at_most=1.05, slope_mb_per_min=details["slope_mb_per_min"])
    growth.target = "<= 1.05x (flat)"
    return [peak_row, growth]
