"""How much Redis memory a backlog takes: the "Sizing Redis" figures of docs/operations.md, measured.

On a private, empty redis-server: 2,000 ``track`` calls with two properties queued for one vendor by the real
producer, then 2,000 of them waiting on the retry schedule (as a failing delivery writes them), then 2,000 of them
held by a worker (kombu's ``unacked`` record, as the take writes it). Each figure is the ``used_memory`` delta
divided by 2,000, and ``MEMORY USAGE`` of the key (``SAMPLES 0``: every element) divided by 2,000.

    .venv/bin/python -m pytest tests/integration/test_redis_sizing.py -s     # prints the table

The test checks that the page's figures are those measured here, within a factor of 1.5 (the allocator and Redis
version move them a little; the page states the version it was measured on).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from worker.dev.localstack import RedisServer

pytestmark = [pytest.mark.integration]

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
N = 2000


def _used(client) -> int:
    return int(client.info("memory")["used_memory"])


def test_bytes_per_queued_delivery_and_per_waiting_retry(product_env, monkeypatch, tmp_path):
    import worker
    from worker import clients
    from worker.broker.transport import take_args
    from worker.envelope import TaskMessages, decode_body
    from worker.producer.publisher import Publisher
    from worker.retries.attempts import RetryState
    from worker.retries.schedule import UNACKED, UNACKED_INDEX, RetrySchedule
    from worker.settings import get_settings

    server = RedisServer().start()
    try:
        monkeypatch.setenv("REDIS_URL", server.url)
        monkeypatch.setenv("SPOOL_DIR", str(tmp_path / "spool"))
        get_settings.cache_clear()
        clients.reset()
        Publisher.reset_default()
        client = server.client()
        schedule = RetrySchedule(client, "vdw")
        worker.track("warm_up", email="w@example.com", vendors=["loops"])  # the connection, the script cache
        schedule.add("loops", "warm-up", 3600)
        client.delete("loops", schedule.key("loops"))

        before = _used(client)
        for i in range(N):
            worker.track("signed_up", email=f"user{i:05d}@example.com", properties={"plan": "pro", "amount": 49},
                         vendors=["loops"])
        assert client.llen("loops") == N
        queued = (_used(client) - before) / N
        queued_key = client.memory_usage("loops", samples=0) / N
        message_bytes = sum(len(m) for m in client.lrange("loops", 0, -1)) / N
        # Its place in its person's order: the events hash and each person's list (one person per call here).
        order = [k for k in client.scan_iter("vdw:order:loops:*", count=1000) if not k.endswith(b":turn")]
        order_keys = sum(client.memory_usage(k, samples=0) for k in order) / N

        # The same deliveries waiting to retry: each the whole message, as the task writes it to the schedule.
        messages = TaskMessages()
        entries = []
        for raw in client.lrange("loops", 0, -1):
            envelope = json.loads(raw)
            (vendor, event), _, _ = decode_body(envelope)
            entries.append(messages.retry(vendor, event, envelope["headers"]["id"], 1,
                                          RetryState(1, time.time()).header()))
        before = _used(client)
        for message in entries:
            schedule.add("loops", message, 3600)
        assert schedule.waiting("loops").count == N
        waiting = (_used(client) - before) / N
        waiting_key = client.memory_usage(schedule.key("loops"), samples=0) / N

        # Held by a worker (taken, not yet acknowledged): the queue's entries moved to kombu's unacked record.
        before = _used(client)
        for _ in range(N):
            client.execute_command(*take_args(["loops"], ["loops"], UNACKED, UNACKED_INDEX, 1))
        assert client.llen("loops") == 0 and client.hlen(UNACKED) == N
        held = (_used(client) - before + queued * N) / N  # the delta is net of the queue entries it freed
        held_keys = (client.memory_usage(UNACKED, samples=0) + client.memory_usage(UNACKED_INDEX, samples=0)) / N
        version = client.info("server")["redis_version"]
    finally:
        Publisher.reset_default()
        clients.reset()
        get_settings.cache_clear()
        server.stop()

    print(f"\nRedis {version}, {N} track calls with two properties, one vendor each "
          f"(the message itself: {message_bytes:,.0f} bytes of JSON)")
    print(f"{'':34} {'used_memory delta':>18} {'MEMORY USAGE':>13}")
    print(f"{'queued delivery (vendor list)':34} {queued:>16,.0f} B {queued_key:>11,.0f} B  (+ {order_keys:,.0f} B: "
          "its place in its person's order, in the delta)")
    print(f"{'waiting retry (retry schedule)':34} {waiting:>16,.0f} B {waiting_key:>11,.0f} B")
    print(f"{'held by a worker (unacked record)':34} {held:>16,.0f} B {held_keys:>11,.0f} B")

    # The compact message (worker/envelope.py): at most 700 bytes of the vendor's list for this event.
    assert queued_key <= 700, f"a queued message takes {queued_key:.0f} B of its list"

    text = OPERATIONS.read_text()
    section = text[text.index("## Sizing Redis"):]
    stated = {name: float(re.search(rf"^\| a {name} .*\| ([\d,]+) \|$", section, re.M).group(1).replace(",", ""))
              for name in ("queued delivery", "waiting retry")}
    for name, measured in (("queued delivery", queued), ("waiting retry", waiting)):
        assert stated[name] / 1.5 <= measured <= stated[name] * 1.5, \
            f"docs/operations.md says {stated[name]:.0f} bytes per {name}; measured {measured:.0f}: update Sizing Redis"
