"""ConveYour identify throughput under a fixed request limit: bulk batching vs one identify per request.

``CONVEYOUR_RATE_LIMIT`` and the sandbox's ConveYour ``rate_limit`` are both set to
``batch_rate`` requests/s; a worker (``-Q conveyour``) drains a backlog of identifies
(``worker.identify(email=..., traits=..., vendors=["conveyour"])``). Identifies
delivered per second count every contact in the 200-answered ``/analytics/identify``
requests (a bulk request is an array) arriving in a steady window after a warm-up.

- ours: the product's default batching (``CONVEYOUR_BATCH_SIZE`` / ``CONVEYOUR_BATCH_MAX_WAIT``).
- baseline: ``CONVEYOUR_BATCH_SIZE=1``.

Both are measured ``Sizes.repeats`` times (alternating); the row shows the medians with their range.

Example::

    python -m tests.benchmarks --only batching
"""

from __future__ import annotations

import math
import time

from .stack import BenchStack, Row, Sizes

GROUP = "batching"
VENDOR = "conveyour"


def _contacts(body: object) -> int:
    return len(body) if isinstance(body, list) else 1


def measure(stack: BenchStack, sizes: Sizes, label: str, backlog: int, **env: str) -> dict:
    import worker

    stack.clean()
    stack.control.configure(VENDOR, rate_limit=sizes.batch_rate)
    template = stack.template(
        lambda: worker.identify(email="b@example.com", traits={"first_name": "Bench", "plan": "pro"},
                                vendors=[VENDOR]), VENDOR)
    stack.workers(1, VENDOR, name=f"batch-{label}", CONVEYOUR_RATE_LIMIT=sizes.batch_rate, **env)
    stack.preload(template, VENDOR, backlog, vary=lambda i, e: e["identity"].update(email=f"b{i}@example.com"))
    t0 = time.monotonic()
    first = None
    while first is None:
        got = stack.control.requests(vendor=VENDOR, limit=1)
        if got:
            first = got[0]["ts"]
        elif time.monotonic() - t0 > 60:
            raise RuntimeError(f"batching ({label}): no request reached the sandbox in 60 s")
        else:
            time.sleep(0.05)
    lo = first + sizes.batch_warmup
    hi = lo + sizes.batch_window
    while time.time() < hi + 0.5:
        time.sleep(0.1)
    records = stack.control.requests(vendor=VENDOR)
    stack.stop_workers()
    stack.check_clean(VENDOR, allowed=(200, 429))
    ok = [r for r in records if r["status"] == 200 and r["path"] == "/analytics/identify" and lo <= r["ts"] < hi]
    contacts = sum(_contacts(r["body"]) for r in ok)
    n429 = sum(1 for r in records if r["status"] == 429)
    rate = contacts / sizes.batch_window
    sizes_seen = sorted({_contacts(r["body"]) for r in ok})
    stack.say(f"conveyour identify, {label}: {rate:.1f} identifies/s in {len(ok)} requests "
              f"({len(ok) / sizes.batch_window:.2f} requests/s), batch sizes {sizes_seen[:5]}..., {n429} x 429")
    return {"identifies_per_second": rate, "requests_in_window": len(ok), "identifies_in_window": contacts,
            "responses_429": n429, "batch_sizes_seen": sizes_seen, "backlog": backlog}


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    span = sizes.batch_warmup + sizes.batch_window
    bases, ours = [], []
    for _ in range(sizes.repeats):
        bases.append(measure(stack, sizes, "batch-size-1", math.ceil(sizes.batch_rate * span * 1.5) + 20,
                             CONVEYOUR_BATCH_SIZE="1"))
        ours.append(measure(stack, sizes, "default",
                            math.ceil(sizes.batch_rate * sizes.batch_size * span * 1.3) + 50))
    n429 = sum(r["responses_429"] for r in bases + ours)
    row = Row.repeated(f"ConveYour identifies/s at {sizes.batch_rate:g} requests/s: batching vs CONVEYOUR_BATCH_SIZE=1",
                       [r["identifies_per_second"] for r in ours], [r["identifies_per_second"] for r in bases], "/s",
                       at_least=10, ours=ours, baseline=bases)
    row.target = ">= 10x"
    if n429:
        row.notes = f"{n429} x 429 from the sandbox"
    return [row]
