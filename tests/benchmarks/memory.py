"""Worker memory while a large backlog drains slowly under a rate limit.

A backlog of N track events for ConvertLoop is preloaded, then one worker process
starts (``-Q convertloop``, ``CONVERTLOOP_RATE_LIMIT=10``): with a limit most of the
backlog stays queued for a long time, and a worker that pulled it into memory,
or kept something per throttled requeue, would grow. The worker's RSS (its
process and any children, from /proc) is sampled every 0.5 s for ``memory_seconds``
— not to completion (100 000 events at 10/s would take almost three hours).

Reported: peak RSS; peak RSS against the same run with a small backlog (does memory grow with
the backlog?); and the last third of the samples against the first (growth, with the slope).
Nothing may be lost: delivered + still queued + unacked must cover the backlog.
"""

from __future__ import annotations

import time

from .stack import BenchError, BenchStack, Row, Sizes, rss_bytes

GROUP = "memory"
QUEUE = "convertloop"
MB = 1024 * 1024


def sample(stack: BenchStack, sizes: Sizes, n: int) -> dict:
    """Preload ``n``, start one rate-limited worker, sample its RSS for ``memory_seconds``."""
    import worker

    seconds = sizes.memory_seconds
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
    if len(values) < 6:
        raise BenchError("memory: too few RSS samples")
    third, half = len(values) // 3, len(values) // 2
    first, last = sum(values[:third]) / third / MB, sum(values[-third:]) / third / MB
    span_min = (samples[-1][0] - samples[0][0]) / 60 or 1
    late = values[half:]
    late_slope = (late[-1] - late[0]) / MB / ((samples[-1][0] - samples[half][0]) / 60 or 1)
    out = {"backlog": n, "seconds": seconds, "delivered": delivered, "left": left,
           "peak_mb": round(max(values) / MB, 1), "first_third_mb": round(first, 1), "last_third_mb": round(last, 1),
           "slope_mb_per_min": round((last - first) / span_min, 2),
           "second_half_slope_mb_per_min": round(late_slope, 2),
           "samples_mb": [(round(t, 1), round(v / MB, 1)) for t, v in samples]}
    stack.say(f"memory, {n:,} backlog: peak {out['peak_mb']} MB, first third {out['first_third_mb']} MB, "
              f"last third {out['last_third_mb']} MB, second-half slope {out['second_half_slope_mb_per_min']} MB/min, "
              f"{delivered} delivered")
    return out


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    small = sample(stack, sizes, sizes.memory_small_backlog)
    big = sample(stack, sizes, sizes.memory_backlog)
    notes = (f"{big['backlog']:,} backlog sampled {big['seconds']:g}s, not drained to completion: "
             f"{big['delivered']:,} delivered ({big['delivered'] / big['seconds']:.1f}/s), "
             f"{big['left']:,} still queued")
    peak = Row(f"worker peak RSS, {big['backlog']:,} backlog draining at 10/s", big["peak_mb"], None, "MB",
               "<= 150 MB", None, big["peak_mb"] <= 150, notes, {"big": big, "small": small})
    vs_backlog = Row.compare(f"worker peak RSS: {big['backlog']:,} backlog vs {small['backlog']:,} backlog "
                             "(same time, same limit)", big["peak_mb"], small["peak_mb"], "MB", at_most=1.10)
    vs_backlog.target = "<= 1.10x (not growing with the backlog)"
    growth = Row.compare("worker RSS, last third vs first third of the samples (informational)",
                         big["last_third_mb"], big["first_third_mb"], "MB",
                         notes=f"slope {big['slope_mb_per_min']} MB/min overall, "
                               f"{big['second_half_slope_mb_per_min']} MB/min over the second half "
                               f"(small backlog: {small['slope_mb_per_min']} / "
                               f"{small['second_half_slope_mb_per_min']} MB/min)")
    return [peak, vs_backlog, growth]
