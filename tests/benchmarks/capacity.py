"""What one delivery costs Redis: commands while it is delivered, bytes while it is dead-lettered.

- **Redis commands per delivery**: ``capacity_events`` two-property ``track`` calls for ConvertLoop (no rate
  limit, ordering on: each call's place in its person's order is written with it) are preloaded, Redis'
  command statistics reset (``CONFIG RESETSTAT``), one worker process started and the queue drained; the
  commands Redis ran (``INFO commandstats``, every command of every client: the worker's take, ack, limiter,
  order, metrics flush, events for Flower, and its idle polling) divided by the deliveries. Baseline: the
  same number of Celery no-op tasks on the same app and queue.
- **Bytes per dead letter**: the same calls answered 400 by the vendor, each dead-lettered once (the event,
  the request and the vendor's answer are kept, and its counts); Redis' ``used_memory`` after the drain less
  before the preload, per dead letter. Baseline: bytes per queued delivery of the same call (its message and
  its place in its person's order).

Both are capacity figures for docs/capacity.md, not targets.

Example::

    $ python -m tests.benchmarks --only capacity
"""

from __future__ import annotations

from .stack import BenchError, BenchStack, Row, Sizes

GROUP = "capacity"
QUEUE = "convertloop"


def _commandstats(stack: BenchStack) -> int:
    return sum(int(v["calls"]) for k, v in stack.r.info("commandstats").items() if k.startswith("cmdstat_"))


def _preload(stack: BenchStack, n: int, noop: bool) -> None:
    import worker

    from .noop import noop as noop_task

    if noop:
        stack.preload(stack.template(lambda: noop_task.delay(), QUEUE), QUEUE, n)
        return
    template = stack.template(
        lambda: worker.track("bench_event", email="c@example.com", properties={"plan": "pro", "amount": 1},
                             vendors=[QUEUE]), QUEUE)
    stack.preload(template, QUEUE, n, vary=lambda i, e: e["identity"].update(email=f"c{i}@example.com"))


def commands_per_message(stack: BenchStack, n: int, noop: bool) -> float:
    stack.clean()
    _preload(stack, n, noop)
    stack.r.config_resetstat()
    stack.workers(1, QUEUE, name="cap-noop" if noop else "cap", include_noop=noop)
    try:
        stack.time_drain(QUEUE, n, timeout=max(120.0, n / 20))
        calls = _commandstats(stack)
    finally:
        stack.stop_workers()
    if not noop:
        stack.check_clean(QUEUE)
    per = calls / n
    stack.say(f"{n} {'no-op tasks' if noop else 'deliveries'}: {calls} Redis commands, {per:.1f} per message")
    return per


def bytes_per_dead_letter(stack: BenchStack, n: int) -> tuple[float, float]:
    """(bytes per dead letter, bytes per queued delivery of the same call)."""
    stack.clean()
    stack.control.configure(QUEUE, fail_all=400)
    before = stack.r.info("memory")["used_memory"]
    _preload(stack, n, noop=False)
    queued = (stack.r.info("memory")["used_memory"] - before) / n
    stack.workers(1, QUEUE, name="cap-dead")
    try:
        stack.time_drain(QUEUE, n, timeout=max(120.0, n / 20))
        dead = stack.r.hlen("vdw:deadletters")
        if dead != n:
            raise BenchError(f"capacity: {n} calls answered 400, {dead} dead letters")
        after = stack.r.info("memory")["used_memory"]
    finally:
        stack.stop_workers()
        stack.control.configure(QUEUE, fail_all=None)
    per = (after - before) / n
    stack.say(f"{n} dead letters: {per:,.0f} B each (queued: {queued:,.0f} B)")
    return per, queued


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    n = sizes.capacity_events
    ours = [commands_per_message(stack, n, noop=False) for _ in range(sizes.repeats)]
    base = [commands_per_message(stack, n, noop=True) for _ in range(sizes.repeats)]
    dead, queued = bytes_per_dead_letter(stack, n)
    return [
        Row.repeated(f"Redis commands per delivery vs per no-op task, {n:,} track → ConvertLoop, one worker "
                     "(informational)", ours, base, "cmds",
                     notes="every command Redis ran during the drain (INFO commandstats: also those a Lua "
                           "script runs), over the messages: take, ack, order, limiter, metrics flush, Flower's "
                           "task events, idle polling"),
        Row.compare(f"Redis bytes per dead letter vs per queued delivery of the same call, {n:,} calls "
                    "(informational)", dead, queued, "B",
                    notes="used_memory after the drain less before the preload; the event, the request, the "
                          "vendor's 400 answer and the counts"),
    ]
