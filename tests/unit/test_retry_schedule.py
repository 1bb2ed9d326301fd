"""The retry schedule on the test Redis: scheduled-and-acknowledged in one step, moved exactly once by any
number of processes, released in chunks, a probe's claim recorded as kombu records a held message."""

from __future__ import annotations

import json
import multiprocessing
import uuid
from collections import Counter

import redis
from kombu.transport import redis as kombu_redis

from worker.broker.app import app
from worker.envelope import TaskMessages
from worker.retries.attempts import RetryState
from worker.retries.schedule import CHUNK, UNACKED, UNACKED_INDEX, RetrySchedule, Waiting


def event(i: int = 0) -> dict:
    return {"id": f"ev{i}", "operation": "track", "created_at": "2026-01-01T00:00:00Z",
            "identity": {"email": "j@a.co"}, "event": "sale", "properties": {}, "occurred_at": None}


def message(queue: str, i: int = 0, retries: int = 1) -> str:
    return TaskMessages().retry(queue, event(i), f"ev{i}.{queue}", retries, RetryState(retries, 1.0).header())


def test_add_acknowledges_the_held_message_in_the_same_step(client, prefix):
    schedule, queue = RetrySchedule(client, prefix), f"{prefix}-q"
    tag = uuid.uuid4().hex
    client.hset(UNACKED, tag, json.dumps([{"x": 1}, "", queue]))
    client.zadd(UNACKED_INDEX, {tag: 1.0})
    schedule.add(queue, message(queue), delay=60, ack_tag=tag)
    assert client.hget(UNACKED, tag) is None and client.zscore(UNACKED_INDEX, tag) is None
    waiting = schedule.waiting(queue)
    assert waiting.count == 1 and 55 < waiting.next_due_in <= 60


def test_equal_retries_stay_two_entries(client, prefix):
    schedule, queue = RetrySchedule(client, prefix), f"{prefix}-q"
    a, b = message(queue, 7), message(queue, 7)
    assert json.loads(a)["headers"] == json.loads(b)["headers"] and a != b  # only the delivery tag differs
    schedule.add(queue, a, 0)
    schedule.add(queue, b, 0)
    assert schedule.waiting(queue).count == 2


def test_retry_message_keeps_the_task_id_and_counts_retries():
    m = json.loads(message("loops", 3, retries=5))
    assert m["headers"]["id"] == "ev3.loops" and m["headers"]["retries"] == 5
    assert RetryState.from_headers(m["headers"]) == RetryState(5, 1.0)
    # No ETA (the schedule is the wait: a worker never holds it) and the vendor's queue as the routing key.
    assert m["headers"].get("eta") is None and m["properties"]["delivery_info"]["routing_key"] == "loops"


def test_promote_moves_only_due_entries(client, prefix):
    schedule, queue = RetrySchedule(client, prefix), f"{prefix}-q"
    schedule.add(queue, message(queue, 1), 0)
    schedule.add(queue, message(queue, 2), 300)
    moved, next_due = schedule.promote(queue)
    assert moved == 1 and client.llen(queue) == 1 and 290 < next_due <= 300
    assert json.loads(client.lindex(queue, 0))["headers"]["id"] == f"ev1.{queue}"
    assert schedule.promote(queue)[0] == 0


def test_release_moves_everything_in_chunks(client, prefix):
    schedule, queue = RetrySchedule(client, prefix), f"{prefix}-q"
    n = 2 * CHUNK + 7
    pipe = client.pipeline()
    for i in range(n):
        pipe.zadd(schedule.key(queue), {f"m{i}": 10_000_000_000 + i})  # due in centuries
    pipe.execute()
    assert schedule.release(queue) == n
    assert client.llen(queue) == n and schedule.waiting(queue) == Waiting(0, None)
    assert client.lrange(queue, -1, -1) == [b"m0"]  # FIFO: the earliest comes out of the consuming end first


def _promote_until_empty(url: str, prefix: str, queue: str, n: int) -> int:
    schedule = RetrySchedule(redis.Redis.from_url(url), prefix)
    moved = 0
    while schedule.client.llen(queue) < n:
        moved += schedule.promote(queue)[0]
    return moved


def test_four_processes_promoting_at_once_move_each_entry_exactly_once(client, prefix, redis_server):
    schedule, queue, n = RetrySchedule(client, prefix), f"{prefix}-q", 3000
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    pipe = client.pipeline()
    for i in range(n):  # due over 2..8 s from now (Redis' clock), 600 distinct times: the processes overlap
        pipe.zadd(schedule.key(queue), {f"m{i}": now + 2 + (i % 600) / 100})
    pipe.execute()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        counts = pool.starmap(_promote_until_empty, [(redis_server.url, prefix, queue, n)] * 4)
    members = Counter(client.lrange(queue, 0, -1))
    print(f"\n4 processes moved {counts} of {n} entries")
    assert sum(1 for c in counts if c) >= 2, "one process moved everything: nothing ran concurrently"
    assert sum(counts) == n and len(members) == n and max(members.values()) == 1
    assert schedule.waiting(queue).count == 0


def test_claim_one_takes_the_earliest_retry_then_the_queue_and_holds_it_as_kombu_does(client, prefix):
    schedule, queue = RetrySchedule(client, prefix), f"{prefix}-q"
    late, early, queued = message(queue, 1), message(queue, 2), message(queue, 3)
    schedule.add(queue, late, 200)
    schedule.add(queue, early, 100)
    client.lpush(queue, queued)
    claimed = [schedule.claim_one(queue) for _ in range(4)]
    assert claimed == [early, late, queued, None]
    for m in claimed[:3]:
        tag = json.loads(m)["properties"]["delivery_tag"]
        record, exchange, routing_key = json.loads(client.hget(UNACKED, tag))
        assert record == json.loads(m) and (exchange, routing_key) == ("", queue)
        assert client.zscore(UNACKED_INDEX, tag) is not None
    # kombu restores such a record like its own (a probe's process died): back on the queue, intact.
    tag = json.loads(early)["properties"]["delivery_tag"]
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, kombu_redis.Channel)
        channel.qos.restore_by_tag(tag, client=client)
    restored = json.loads(client.lindex(queue, -1))
    assert restored["properties"]["delivery_tag"] == tag and restored["headers"]["redelivered"] is True
    for m in claimed[1:3]:
        schedule.ack(json.loads(m)["properties"]["delivery_tag"])


def test_give_back_puts_the_message_where_it_is_taken_next(client, prefix):
    schedule, queue = RetrySchedule(client, prefix), f"{prefix}-q"
    client.lpush(queue, message(queue, 1))
    client.lpush(queue, message(queue, 2))
    m = schedule.claim_one(queue)
    assert json.loads(m)["headers"]["id"] == f"ev1.{queue}"
    tag = json.loads(m)["properties"]["delivery_tag"]
    schedule.give_back(queue, m, tag)
    assert client.lindex(queue, -1) == m.encode() and client.hget(UNACKED, tag) is None
