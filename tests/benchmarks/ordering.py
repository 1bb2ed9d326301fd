"""What per-person ordering costs, and what merging a person's waiting updates saves.

Three figures, each against its baseline in the same run, all to ConvertLoop:

- **deliveries/s, ordering on vs off**: N ``track`` calls, one per person, published
  through the real producer (``worker.track``) with ordering on (the product default)
  and with ``ORDERING=false`` in the producer's environment (this process; settings are
  read per process, so the variable is set here and the settings and publisher made
  anew). The worker is the same either way: one process, default pool and concurrency,
  the sandbox without latency or limit, like the throughput group. Each drain is timed
  from the first message taken to the last call settled: queue empty, nothing unacked,
  no call pending in any person's order, no retry waiting, nobody parked. Interleaved
  (on, off; then off, on; ...) ``Sizes.repeats`` times: medians with their range.
- **Redis calls per delivery**: ``INFO commandstats`` on the private Redis before the
  worker starts and when the drain is settled, all commands summed (those a Lua script
  runs included, as Redis counts them) minus the benchmark's own polls, divided by the
  deliveries. Ours: ordering on; baseline: off.
- **backlog merge**: ``ordering_backlog_calls`` identify/segment calls over
  ``ordering_backlog_people`` people (a fixed random mix: identify with changing traits,
  segment adds and removes), published person after person round-robin while no worker
  runs (the vendor unreachable), then drained by one worker against the vendor at
  ``ordering_backlog_rate`` requests/s (the worker's ``CONVERTLOOP_RATE_LIMIT`` and the
  sandbox's own ``rate_limit``). Rows: the requests the sandbox received, against one per
  call; and the drain time, against the time one request per call takes at that rate
  (calls / rate: computed, not run; that is what ``ORDERING=false`` does). Afterwards
  every person's state at the sandbox (``/_sandbox/state``) must equal the calls
  applied in order, or the run is broken (BenchError).

Example::

    python -m tests.benchmarks --only ordering
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from .stack import UNACKED_KEY, BenchError, BenchStack, Row, Sizes, cpu_seconds, median_run

GROUP = "ordering"
VENDOR = "convertloop"
#: What one poll of :func:`_settle` sends (its commands are subtracted from the drain's Redis calls).
POLL_COMMANDS = {"llen": 1, "hlen": 2, "zcard": 2}
#: Segment names and trait values the backlog's calls pick from.
SEGMENTS = ("trial", "vip", "paid", "churn-risk", "beta")
PLANS = ("free", "starter", "pro", "enterprise")


# -- the producer's ORDERING --------------------------------------------------------


@contextmanager
def producer_ordering(on: bool) -> Iterator[None]:
    """This process (the producer) publishes with ``ORDERING`` on or off; restored afterwards."""
    from worker.producer.publisher import Publisher
    from worker.settings import get_settings

    old = os.environ.get("ORDERING")

    def apply(value: str | None) -> None:
        if value is None:
            os.environ.pop("ORDERING", None)
        else:
            os.environ["ORDERING"] = value
        get_settings.cache_clear()
        Publisher.reset_default()

    apply("true" if on else "false")
    try:
        if get_settings().ordering is not on:
            raise BenchError(f"ORDERING={os.environ['ORDERING']} did not reach the producer's settings")
        yield
    finally:
        apply(old)


# -- Redis calls ------------------------------------------------------------------


def commandstats(r: redis.Redis) -> dict[str, int]:
    """Calls so far per command (``INFO commandstats``)."""
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in r.info("commandstats").items()}


def calls_between(before: dict[str, int], after: dict[str, int], polls: int = 0) -> dict[str, int]:
    """Calls per command from ``before`` to ``after``, without the benchmark's own: ``polls`` polls of
    :func:`_settle` and the INFO that took ``before``.

    >>> calls_between({"info": 3, "get": 1}, {"info": 4, "get": 9, "llen": 5, "hlen": 10, "zcard": 12}, polls=5)
    {'get': 8, 'zcard': 2}
    """
    mine = {name: n * polls for name, n in POLL_COMMANDS.items()}
    mine["info"] = 1
    out = {}
    for name in sorted(set(before) | set(after)):
        n = after.get(name, 0) - before.get(name, 0) - mine.get(name, 0)
        if n:
            out[name] = n
    return out


def _top(calls: dict[str, int], per: int, most: int = 6) -> str:
    """The commands with the most calls, per delivery (or per call); none under 0.01.

    >>> _top({"evalsha": 2040, "get": 2000, "hello": 1, "lpush": 1000}, 1000, most=2)
    'evalsha 2.04, get 2.00'
    """
    ranked = sorted(calls.items(), key=lambda kv: -kv[1])[:most]
    return ", ".join(f"{name} {n / per:.2f}" for name, n in ranked if n / per >= 0.005)


# -- waiting for the calls to settle --------------------------------------------------


def _settle(stack: BenchStack, n: int, timeout: float, poll: float = 0.01) -> tuple[float, float, int]:
    """Wait until every call is settled: the queue empty, nothing unacked, no call pending in a person's
    order, no retry waiting, nobody parked. Returns (first take, settled) as monotonic times, and the polls.

    The start is the first poll that sees fewer than ``n`` messages on the queue.
    """
    from worker import keys
    from worker.settings import get_settings

    prefix = get_settings().key_prefix
    events, base = keys.order_keys(prefix, VENDOR)
    retries, held = f"{prefix}:retries:{VENDOR}", f"{base}:held"
    start, polls = None, 0
    deadline = time.monotonic() + timeout
    while True:
        pipe = stack.r.pipeline(transaction=False)
        pipe.llen(VENDOR)
        pipe.hlen(UNACKED_KEY)
        pipe.hlen(events)
        pipe.zcard(retries)
        pipe.zcard(held)
        queued, unacked, pending, waiting, parked = pipe.execute()
        polls += 1
        now = time.monotonic()
        if start is None and queued < n:
            start = now
        if not (queued or unacked or pending or waiting or parked):
            return (start if start is not None else now), now, polls
        if now > deadline:
            raise BenchError(f"{VENDOR}: after {timeout:.0f}s still {queued} queued, {unacked} unacked, "
                             f"{pending} pending in people's order, {waiting} waiting to retry, "
                             f"{parked} people parked")
        time.sleep(poll)


def _publish(stack: BenchStack, calls: list[Callable[[], object]], ordered: bool) -> dict[str, Any]:
    """Make the producer calls (this process) with ordering on or off; what they cost Redis."""
    with producer_ordering(ordered):
        before = commandstats(stack.r)
        t0 = time.perf_counter()
        for call in calls:
            call()
        took = time.perf_counter() - t0
        redis_calls = calls_between(before, commandstats(stack.r))
    return {"seconds": round(took, 3), "per_second": len(calls) / took, "redis_calls": redis_calls,
            "redis_calls_per_call": sum(redis_calls.values()) / len(calls)}


# -- 1 and 2: deliveries/s and Redis calls, ordering on vs off ---------------------------


def _drain(stack: BenchStack, n: int, ordered: bool) -> dict[str, Any]:
    import worker

    stack.clean()
    calls = [lambda i=i: worker.track("bench_event", email=f"u{i}@example.com",
                                      properties={"plan": "pro", "amount": 1}, vendors=[VENDOR])
             for i in range(n)]
    published = _publish(stack, calls, ordered)
    if stack.r.llen(VENDOR) != n:
        raise BenchError(f"ordering: {n} calls made, {stack.r.llen(VENDOR)} messages on {VENDOR}")
    label = "on" if ordered else "off"
    before = commandstats(stack.r)
    procs = stack.workers(1, VENDOR, name=f"ord-{label}")
    pid = procs[0].proc.pid
    cpu0 = cpu_seconds(pid)
    try:
        start, end, polls = _settle(stack, n, timeout=max(120.0, n / 20))
        cpu = cpu_seconds(pid) - cpu0
        redis_calls = calls_between(before, commandstats(stack.r), polls)
    finally:
        stack.stop_workers()
    stats = stack.vendor_stats(VENDOR)
    if stats.get("200", 0) != n:
        raise BenchError(f"ordering {label}: {n} calls published, the sandbox answered {stats}")
    stack.check_clean(VENDOR)
    rate = n / (end - start)
    total = sum(redis_calls.values())
    stack.say(f"{n} track calls, ordering {label}: {end - start:.2f}s = {rate:,.0f}/s; Redis calls per delivery "
              f"{total / n:.2f} ({_top(redis_calls, n, 4)}); producer {published['redis_calls_per_call']:.1f} "
              f"Redis calls per call")
    return {"n": n, "seconds": round(end - start, 3), "per_second": rate,
            "worker_cpu_ms_per_delivery": round(1000 * cpu / n, 3), "redis_calls": redis_calls,
            "redis_calls_per_delivery": total / n, "producer": published}


def throughput_rows(stack: BenchStack, sizes: Sizes) -> list[Row]:
    from worker.settings import get_settings

    n = sizes.ordering_calls
    got: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for i in range(sizes.repeats):
        if sizes.repeats > 1:
            stack.say(f"ordering run {i + 1} of {sizes.repeats}")
        for ordered in ((True, False) if i % 2 == 0 else (False, True)):  # alternate who goes first
            got[ordered].append(_drain(stack, n, ordered))
    on, off = median_run(got[True]), median_run(got[False])
    producer_on, producer_off = on["producer"], off["producer"]
    concurrency = get_settings().worker_concurrency
    return [
        Row.repeated(f"deliveries/s, {n:,} track → ConvertLoop (one per person), ordering on vs ORDERING=false",
                     [r["per_second"] for r in got[True]], [r["per_second"] for r in got[False]], "/s",
                     at_least=0.90,
                     notes=f"ORDERING set in the producer's environment; the same worker either way (1 process, "
                           f"threads pool, concurrency {concurrency}), sandbox without latency or limit; runs "
                           f"interleaved; in the median runs worker CPU per delivery "
                           f"{on['worker_cpu_ms_per_delivery']} ms on vs {off['worker_cpu_ms_per_delivery']} ms off",
                     on=got[True], off=got[False]),
        Row.repeated("Redis calls per delivery draining them, ordering on vs off",
                     [r["redis_calls_per_delivery"] for r in got[True]],
                     [r["redis_calls_per_delivery"] for r in got[False]], "calls",
                     notes="INFO commandstats from before the worker starts to the drain settled, every command "
                           "counted (those inside Lua scripts too, as Redis counts them; the worker's start-up and "
                           "idle loops included), the benchmark's own polls subtracted; per delivery in the median "
                           f"runs, on: {_top(on['redis_calls'], n)}; off: {_top(off['redis_calls'], n)}. "
                           f"The producer's Redis calls per call (not in the figure): "
                           f"{producer_on['redis_calls_per_call']:.2f} on ({_top(producer_on['redis_calls'], n)}), "
                           f"{producer_off['redis_calls_per_call']:.2f} off ({_top(producer_off['redis_calls'], n)})"),
    ]


# -- 3: a backlog of updates merged ----------------------------------------------------


def backlog_calls(people: int, per_person: int, seed: int = 7) -> list[tuple[str, str, dict[str, Any]]]:
    """(operation, email, arguments) of each call, person after person round-robin (every person's first call,
    then every person's second...): identify with changing traits and segment adds/removes, mixed.

    >>> calls = backlog_calls(100, 10)
    >>> len(calls), sorted({op for op, _, _ in calls}), [email for _, email, _ in calls[:2]], calls[100][1]
    (1000, ['identify', 'segment'], ['p0@example.com', 'p1@example.com'], 'p0@example.com')
    """
    rng = random.Random(seed)
    out = []
    for step in range(per_person):
        for p in range(people):
            email = f"p{p}@example.com"
            if step == 0 or (step % 2 == 0 and rng.random() < 0.8) or rng.random() < 0.2:
                traits: dict[str, Any] = {"plan": rng.choice(PLANS), "step": step}
                if rng.random() < 0.5:
                    traits[f"field_{rng.randrange(4)}"] = rng.randrange(1000)
                out.append(("identify", email, {"traits": traits}))
            else:
                add, remove = rng.sample(SEGMENTS, 2)
                args: dict[str, Any] = {"add": [add], "remove": [remove]}
                if rng.random() < 0.3:
                    args = {"add": [add]} if rng.random() < 0.5 else {"remove": [remove]}
                out.append(("segment", email, args))
    return out


def expected_states(calls: list[tuple[str, str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each person's ConvertLoop state after ``calls`` applied in order: attributes, segments (sorted).

    >>> expected_states([("identify", "a@x.co", {"traits": {"plan": "free", "n": 1}}),
    ...                  ("segment", "a@x.co", {"add": ["vip", "beta"]}),
    ...                  ("identify", "a@x.co", {"traits": {"plan": "pro"}}),
    ...                  ("segment", "a@x.co", {"add": ["paid"], "remove": ["vip"]})])
    {'a@x.co': {'attributes': {'plan': 'pro', 'n': 1}, 'segments': ['beta', 'paid']}}
    """
    traits: dict[str, dict[str, Any]] = {}
    members: dict[str, dict[str, bool]] = {}
    for op, email, args in calls:
        if op == "identify":
            traits.setdefault(email, {}).update(args["traits"])
        else:
            m = members.setdefault(email, {})
            m.update(dict.fromkeys(args.get("add", ()), True))
            m.update(dict.fromkeys(args.get("remove", ()), False))
    people = dict.fromkeys(email for _, email, _ in calls)
    return {e: {"attributes": traits.get(e, {}), "segments": sorted(n for n, on in members.get(e, {}).items() if on)}
            for e in people}


def wrong_people(expected: dict[str, dict[str, Any]], got: dict[str, Any]) -> list[str]:
    """Each person whose state at the sandbox is not the expected one, described."""
    wrong = []
    for email, want in expected.items():
        state = got.get(email) or {}
        have = {"attributes": state.get("attributes"), "segments": sorted(state.get("segments") or [])}
        if have != want or state.get("events"):
            wrong.append(f"{email}: expected {want}, the vendor holds {state or None}")
    return wrong


def backlog_rows(stack: BenchStack, sizes: Sizes) -> list[Row]:
    import worker

    people, rate = sizes.ordering_backlog_people, sizes.ordering_backlog_rate
    per_person = sizes.ordering_backlog_calls // people
    calls = backlog_calls(people, per_person)
    n = len(calls)
    stack.clean()
    stack.control.configure(VENDOR, rate_limit=rate)
    producers = {"identify": worker.identify, "segment": worker.segment}
    published = _publish(stack, [lambda op=op, e=email, a=args: producers[op](email=e, vendors=[VENDOR], **a)
                                 for op, email, args in calls], ordered=True)
    if stack.r.llen(VENDOR) != n:
        raise BenchError(f"ordering backlog: {n} calls made, {stack.r.llen(VENDOR)} messages on {VENDOR}")
    stack.say(f"backlog: {n:,} identify/segment calls over {people:,} people queued with no worker running "
              f"({published['per_second']:,.0f} calls/s); draining at {rate:g}/s")
    procs = stack.workers(1, VENDOR, name="ord-backlog", CONVERTLOOP_RATE_LIMIT=str(rate))
    try:
        start, end, _ = _settle(stack, n, timeout=max(60.0, 4 * people / rate + 60))
    finally:
        merged = _merged_log_lines(procs[0].log())
        stack.stop_workers()
    stack.check_clean(VENDOR, allowed=(200, 429))
    stats = stack.vendor_stats(VENDOR)
    received = sum(stats.values())
    seconds = end - start
    got = stack.control.state(VENDOR)
    wrong = wrong_people(expected_states(calls), got)
    if wrong:
        raise BenchError(f"ordering backlog: {len(wrong)} of {people} people hold the wrong state at the vendor; "
                         f"e.g. {wrong[:3]}")
    writes = sorted(int((got.get(e) or {}).get("writes", 0)) for e in {email for _, email, _ in calls})
    baseline_seconds = n / rate
    stack.say(f"backlog drained in {seconds:.1f}s with {received:,} requests ({stats}); every person's state "
              f"right; writes per person {writes[0]}–{writes[-1]}")
    details = {"calls": n, "people": people, "rate": rate, "seconds": round(seconds, 3), "by_status": stats,
               "writes_per_person": {"min": writes[0], "max": writes[-1], "median": writes[len(writes) // 2]},
               "merged_log_lines": merged, "producer": published}
    answered = ", ".join(f"{c:,} × {s}" for s, c in sorted(stats.items()))
    return [
        Row.compare(f"requests to drain {n:,} identify/segment calls over {people:,} people queued while the "
                    f"vendor was away (ConvertLoop at {rate:g}/s), vs one request per call",
                    received, n, "requests", at_most=0.15,
                    notes=f"target ≤ {0.15 * n:,.0f} requests; the sandbox answered {answered}; every person's final "
                          f"state at the sandbox checked against the calls applied in order (all "
                          f"{people:,} right); the baseline is what ORDERING=false sends, one request per call",
                    **details),
        Row.compare(f"time to drain that backlog at {rate:g}/s, vs one request per call",
                    seconds, baseline_seconds, "s", at_most=0.2,
                    notes=f"the baseline is computed, not measured: {n:,} calls / {rate:g} per second = "
                          f"{baseline_seconds:,.0f} s, the least one request per call (ORDERING=false) can take at "
                          f"that rate; ours: from the first message taken to every call settled",
                    **details),
    ]


def _merged_log_lines(log: str) -> int:
    """How many "merged" task results the worker logged (calls delivered with another call's request)."""
    return log.count("merged, delivered in another call's request")


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    try:
        return [*throughput_rows(stack, sizes), *backlog_rows(stack, sizes)]
    finally:
        stack.clean()  # the groups after this one find no rate limit at the sandbox, no backlog's leftovers
