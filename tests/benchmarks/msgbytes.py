"""Redis bytes per queued and per waiting delivery: the compact message vs the format before vs stock Celery.

The same N ``track`` calls with two properties (the real producer's validated events, one person each, for
ConvertLoop: the queue a stock ``deliver.delay()`` goes to) are written three ways:

- **ours**: the product's compact message (``worker/envelope.py``), as the publisher writes it (with its
  person's ``vdw_order``); waiting: the retry message a worker writes (``retries`` 1, the retry header);
- **before**: the format before compact messages (``tests/legacy_messages.py``: every header Celery writes,
  the body base64, the event with its unset fields as nulls), queued and waiting as it was written then;
- **stock**: what ``deliver.delay(vendor, event)`` publishes (Celery's ``as_task_v2``, kombu's Redis
  properties; the args summary is Celery's repr of the arguments): one real publish, cloned per event as Celery
  writes each (task id, root id, correlation id, args repr, delivery tag, body); waiting: the same message with
  ``retries`` 1 and the retry header as the product wrote it before, as Celery has no Redis-side wait.

Queued: the messages LPUSHed on one list; waiting: ZADDed on one sorted set (scored a second apart). Each
figure is the ``used_memory`` delta divided by N (``MEMORY USAGE`` of the key, ``SAMPLES 0``, in the details),
the median of ``Sizes.repeats`` rounds; the message alone — a delivery's place in its person's order (the same
for every format, not written here) is in the notes, from the sizing test. Target: ours at most half of each,
and a queued message at most 700 bytes.

Example::

    $ python -m tests.benchmarks --only bytes
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from .stack import BenchStack, Row, Sizes, spread

GROUP = "bytes"
#: The issue's ceiling for one queued two-property track (bytes of its list).
MESSAGE_MAX = 700
CHUNK = 1000


def _events(n: int) -> list[dict[str, Any]]:
    """``n`` validated two-property track calls, one person each, as the producer makes them."""
    from worker.producer.api import prepare_track

    return [prepare_track("signed_up", email=f"user{i:05d}@example.com", properties={"plan": "pro", "amount": 49},
                          vendors=["convertloop"]).payload for i in range(n)]


def _stock_clone(template: dict[str, Any], vendor: str, event: dict[str, Any], extra: dict[str, Any]) -> str:
    """The message Celery writes for ``deliver.delay(vendor, event)``, from one it wrote for another event."""
    task_id = str(uuid.uuid4())  # Celery's own task ids
    args, kwargs, embed = json.loads(base64.b64decode(template["body"]))
    body = json.dumps([[vendor, event], kwargs, embed])
    message = dict(template, body=base64.b64encode(body.encode()).decode())
    message["headers"] = {**template["headers"], "id": task_id, "root_id": task_id,
                          "argsrepr": repr((vendor, event)), **extra}
    message["properties"] = {**template["properties"], "correlation_id": task_id, "delivery_tag": str(uuid.uuid4())}
    return json.dumps(message)


def _messages(stack: BenchStack, events: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """{format: {"queued": [...], "waiting": [...]}} for the same events."""
    from tests.legacy_messages import LegacyTaskMessages, legacy_event
    from worker.broker.tasks import deliver
    from worker.envelope import TaskMessages
    from worker.keys import HEADER, person_id
    from worker.retries.attempts import RetryState
    from worker.vendors import VENDORS

    vendor = deliver.app.conf.task_default_queue
    stack.r.delete(vendor)
    template = stack.template(lambda: deliver.delay(vendor, events[0]), vendor)
    ours, before = TaskMessages(), LegacyTaskMessages()
    now = time.time()
    out: dict[str, dict[str, list[str]]] = {f: {"queued": [], "waiting": []} for f in ("ours", "before", "stock")}
    for event in events:
        person = person_id(VENDORS[vendor].person_key(event["identity"]) or "")
        task_id = f"{event['id']}.{vendor}"
        ((_, queued),) = ours.build(event, [vendor], persons={vendor: person})
        out["ours"]["queued"].append(queued)
        out["ours"]["waiting"].append(ours.retry(vendor, event, task_id, 1,
                                                 {**RetryState(1, now).header(), HEADER: person}))
        full, text = legacy_event(event)
        old_header = {"vdw_retry": {"attempts": 1, "first_failure": now}}
        ((_, queued),) = before.build(full, [vendor], event_json=text, persons={vendor: person})
        out["before"]["queued"].append(queued)
        out["before"]["waiting"].append(before.retry(vendor, full, task_id, 1, {**old_header, HEADER: person}))
        out["stock"]["queued"].append(_stock_clone(template, vendor, event, {}))
        out["stock"]["waiting"].append(_stock_clone(template, vendor, event, {"retries": 1, **old_header}))
    return out


def _measure(stack: BenchStack, kind: str, messages: list[str]) -> tuple[float, float]:
    """Bytes per entry: (used_memory delta, MEMORY USAGE of the key), for ``messages`` on a list or a sorted set."""
    key = f"bench:bytes:{kind}"
    stack.r.delete(key)
    before = stack.r.info("memory")["used_memory"]
    for i in range(0, len(messages), CHUNK):
        chunk = messages[i:i + CHUNK]
        if kind == "queued":
            stack.r.lpush(key, *chunk)
        else:
            stack.r.zadd(key, {m: i + j for j, m in enumerate(chunk)})
    delta = (stack.r.info("memory")["used_memory"] - before) / len(messages)
    usage = stack.r.memory_usage(key, samples=0) / len(messages)
    stack.r.delete(key)
    return delta, usage


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    n = sizes.bytes_messages
    stack.clean()
    messages = _messages(stack, _events(n))
    stack.clean()
    stack.r.lpush("bench:bytes:warm", "x")  # the database's own structures, before the first figure
    deltas: dict[tuple[str, str], list[float]] = {}
    usages: dict[tuple[str, str], list[float]] = {}
    for _ in range(sizes.repeats):
        for kind in ("queued", "waiting"):
            for fmt in ("ours", "before", "stock"):
                delta, usage = _measure(stack, kind, messages[fmt][kind])
                deltas.setdefault((fmt, kind), []).append(delta)
                usages.setdefault((fmt, kind), []).append(usage)
    length = {(f, k): sum(map(len, messages[f][k])) / n for f in messages for k in ("queued", "waiting")}
    median = {key: spread(values)["median"] for key, values in usages.items()}
    stack.say("bytes per entry (used_memory delta / MEMORY USAGE / message JSON): " + "; ".join(
        f"{f} {k} {spread(deltas[f, k])['median']:.0f} / {median[f, k]:.0f} / {length[f, k]:.0f}"
        for k in ("queued", "waiting") for f in ("ours", "before", "stock")))

    rows = []
    for kind, where in (("queued", "its queue, a list"), ("waiting", "the retry schedule, a sorted set")):
        for base, what in (("before", "the format before (same event)"), ("stock", "a stock deliver.delay()")):
            row = Row.repeated(f"Redis bytes per {kind} delivery (two-property track, the message on {where}): "
                               f"compact vs {what}", [round(x, 1) for x in deltas["ours", kind]],
                               [round(x, 1) for x in deltas[base, kind]], "B", at_most=0.5,
                               notes=(f"{n:,} messages; MEMORY USAGE per entry {median['ours', kind]:.0f} B vs "
                                      f"{median[base, kind]:.0f} B; message JSON {length['ours', kind]:.0f} B vs "
                                      f"{length[base, kind]:.0f} B. A delivery's place in its person's order (about "
                                      "520 B, tests/integration/test_redis_sizing.py) is not in these figures"),
                               memory_usage={f: median[f, kind] for f in ("ours", "before", "stock")},
                               message_json={f: length[f, kind] for f in ("ours", "before", "stock")})
            if kind == "queued" and base == "before":
                row.target = f"<= 0.5x, <= {MESSAGE_MAX} B"
                row.met = bool(row.met) and row.ours is not None and row.ours <= MESSAGE_MAX \
                    and median["ours", kind] <= MESSAGE_MAX
            rows.append(row)
    stack.clean()
    return rows
