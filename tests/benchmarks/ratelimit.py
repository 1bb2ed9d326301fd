"""Rate-limit utilisation: delivered/s against the configured limit, across 1, 2 and 4 worker processes.

Each run: ``LOOPS_RATE_LIMIT=L`` for every worker (``-Q loops``) and the sandbox's own
Loops ``rate_limit`` switch set to ``L`` too, so the sandbox answers 429 if the
workers together ever exceed it. The workers start first, then a backlog larger
than the window needs is preloaded. Delivered/s counts the sandbox's 200s whose
arrival falls in a steady window that starts ``rate_warmup`` seconds after the first
request (the warm-up is excluded); 429s are counted over the whole run.
"""

from __future__ import annotations

import math
import time

from tests.helpers import max_in_window

from .stack import BenchStack, Row, Sizes

GROUP = "ratelimit"
VENDOR = "loops"


def measure(stack: BenchStack, limit: float, processes: int, sizes: Sizes) -> Row:
    import worker

    stack.clean()
    stack.control.configure(VENDOR, rate_limit=limit)
    template = stack.template(
        lambda: worker.track("bench_event", email="rl@example.com", properties={"n": 1}, vendors=[VENDOR]), VENDOR)
    stack.workers(processes, VENDOR, name=f"rl{limit:g}x{processes}", LOOPS_RATE_LIMIT=limit)
    backlog = math.ceil(limit * (sizes.rate_warmup + sizes.rate_window) * 1.5) + 20
    stack.preload(template, VENDOR, backlog, vary=lambda i, e: e["identity"].update(email=f"rl{i}@example.com"))
    t0 = time.monotonic()
    # Wait for the first request, then for the window to pass.
    first = None
    while first is None:
        got = stack.control.requests(vendor=VENDOR, limit=1)
        if got:
            first = got[0]["ts"]
        elif time.monotonic() - t0 > 30:
            raise RuntimeError(f"rate limit {limit:g}/s x{processes}: no request reached the sandbox in 30 s")
        else:
            time.sleep(0.05)
    end = first + sizes.rate_warmup + sizes.rate_window
    while time.time() < end + 0.5:
        time.sleep(0.1)
    records = stack.control.requests(vendor=VENDOR)
    stack.stop_workers()
    stack.check_clean(VENDOR, allowed=(200, 429))
    lo, hi = first + sizes.rate_warmup, end
    ok_in_window = [r["ts"] for r in records if r["status"] == 200 and lo <= r["ts"] < hi]
    n429 = sum(1 for r in records if r["status"] == 429)
    rate = len(ok_in_window) / sizes.rate_window
    burst = max_in_window([r["ts"] for r in records if r["status"] == 200])
    stack.say(f"limit {limit:g}/s, {processes} process(es): {rate:.2f}/s in the window, {n429} x 429, "
              f"max {burst} in any 1 s")
    row = Row.compare(f"rate limit {limit:g}/s, {processes} worker process(es): delivered/s vs limit",
                      rate, limit, "/s", at_least=0.95, window_s=sizes.rate_window, warmup_s=sizes.rate_warmup,
                      delivered_in_window=len(ok_in_window), responses_429=n429, max_in_any_1s=burst,
                      backlog=backlog, requests_total=len(records))
    row.target = ">= 0.95, no 429"
    row.met = bool(row.met) and n429 == 0
    if n429:
        row.notes = f"{n429} x 429 from the sandbox"
    return row


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    return [measure(stack, limit, procs, sizes) for limit in sizes.rate_limits for procs in sizes.rate_processes]
