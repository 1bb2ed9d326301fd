"""A full Redis (maxmemory reached, noeviction) is named for what it is and survived.

Each test runs its own redis-server and fills it with ``CONFIG SET maxmemory 1`` (below any use): Redis then
refuses every command that adds memory with ``OOM command not allowed`` (redis-py's ``OutOfMemoryError``),
answers reads and deletes, and runs a script whose first write frees memory.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import redis

from tests.helpers import kombu_envelope
from worker.dev.localstack import RedisServer, wait_until
from worker.redisconf import REDIS_FULL


@pytest.fixture
def full_redis():
    """A private redis-server; ``fill()`` puts it at maxmemory, ``room()`` lifts the limit."""
    server = RedisServer().start()
    client = server.client()
    server.fill = lambda: client.config_set("maxmemory", 1)  # type: ignore[attr-defined]
    server.room = lambda: client.config_set("maxmemory", 0)  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        client.close()
        server.stop()


@pytest.fixture
def producer_on(product_env, monkeypatch, tmp_path):
    """Point this process's producer at ``server`` (a fresh publisher, a spool of its own)."""
    from worker import clients
    from worker.producer.publisher import Publisher
    from worker.settings import get_settings

    def point(server: RedisServer, **env: str) -> None:
        monkeypatch.setenv("REDIS_URL", server.url)
        monkeypatch.setenv("SPOOL_DIR", str(tmp_path / "spool"))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        clients.reset()
        Publisher.reset_default()

    yield point
    Publisher.reset_default()
    clients.reset()
    get_settings.cache_clear()


# -- the producer --------------------------------------------------------------------------------------------


def test_a_full_redis_spools_the_event_and_the_log_says_redis_is_full(full_redis, producer_on, caplog):
    import worker
    from worker.producer.publisher import Publisher

    producer_on(full_redis)
    full_redis.fill()
    with caplog.at_level(logging.WARNING, logger="worker.producer.publisher"):
        event_id = worker.track("sale", email="a@example.com", properties={"amount": 1})
    assert event_id
    spool = Publisher.default().spool
    assert spool is not None and spool.pending() == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "worker.producer.publisher"]
    assert any(line.startswith(f"{REDIS_FULL}, spooling events to ") and "until it has room" in line
               for line in lines), lines
    assert not any("broker unreachable" in line for line in lines), lines
    assert full_redis.client().llen("loops") == 0


def test_the_flusher_keeps_trying_until_redis_has_room(full_redis, producer_on, caplog):
    import worker
    from worker.producer.publisher import Publisher

    producer_on(full_redis)
    full_redis.fill()
    ids = [worker.track("sale", email=f"{i}@example.com", vendors=["loops"]) for i in range(3)]
    publisher = Publisher.default()
    assert publisher.spool is not None and publisher.spool.pending() == 3
    assert publisher.flush_once() is False, "Redis answers PING but refuses the write: not flushed"
    assert publisher.spool.pending() == 3 and REDIS_FULL in publisher.cause()
    refused = []
    push = publisher._push

    def counted(messages):
        try:
            push(messages)
        except redis.OutOfMemoryError:
            refused.append(1)
            raise

    publisher._push = counted  # type: ignore[method-assign]
    wait_until(lambda: len(refused) >= 3, timeout=15, message="the flusher to try again, and again, while full")
    assert publisher.spool.pending() == 3
    with caplog.at_level(logging.WARNING, logger="worker.producer.publisher"):
        full_redis.room()
        wait_until(lambda: publisher.spool.pending() == 0, timeout=15, message="the flusher to publish the spool")
        wait_until(lambda: "Redis has room again; spool drained" in caplog.text, timeout=15,
                   message="the flusher's line")
    queued = full_redis.client().lrange("loops", 0, -1)
    assert sorted(i for i in ids if any(i.encode() in m for m in queued)) == sorted(ids)


def test_with_the_spool_off_the_error_names_a_full_redis(full_redis, producer_on):
    import worker

    producer_on(full_redis, SPOOL_ENABLED="false")
    full_redis.fill()
    with pytest.raises(worker.EnqueueError) as error:
        worker.track("sale", email="a@example.com")
    assert REDIS_FULL in str(error.value) and "SPOOL_ENABLED=false" in str(error.value)
    assert "broker unreachable" not in str(error.value)


def test_the_asyncio_api_spools_on_a_full_redis_too(full_redis, producer_on, caplog):
    import worker
    from worker.producer.publisher import Publisher

    producer_on(full_redis)
    full_redis.fill()

    async def call() -> str:
        return await worker.aio.track("sale", email="a@example.com", vendors=["loops"])

    with caplog.at_level(logging.WARNING, logger="worker.producer.publisher"):
        assert asyncio.run(call())
    spool = Publisher.default().spool
    assert spool is not None and spool.pending() == 1
    assert REDIS_FULL in caplog.text


# -- the worker's Redis writes -------------------------------------------------------------------------------


def test_a_take_refused_by_a_full_redis_leaves_the_message_on_its_queue(full_redis):
    """The take records before it pops: a full Redis refuses its first write and nothing changes."""
    from worker.broker.transport import take_args

    client = full_redis.client()
    message = json.dumps(kombu_envelope("t1"))
    client.lpush("q", message)
    take = take_args(["q"], ["q"], "unacked", "unacked_index", 1)
    full_redis.fill()
    with pytest.raises(redis.OutOfMemoryError):
        client.execute_command(*take)
    assert client.lrange("q", 0, -1) == [message.encode()]
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    full_redis.room()
    [(queue, taken, recorded)] = client.execute_command(*take)
    assert (queue, taken, recorded) == (b"q", message.encode(), 1)
    assert client.llen("q") == 0 and json.loads(client.hget("unacked", "t1"))[0] == kombu_envelope("t1")


def _channel(server: RedisServer):
    from kombu import Connection

    conn = Connection(server.url, transport="worker.broker.transport:Transport")
    return conn, conn.channel()


def _hold(client: redis.Redis, tag: str, score: float = 1.0) -> None:
    """A message a worker took, as kombu records it."""
    client.hset("unacked", tag, json.dumps([kombu_envelope(tag), "", "q"]))
    client.zadd("unacked_index", {tag: score})


def test_an_ack_goes_through_on_a_full_redis(full_redis):
    """Stock kombu acks with MULTI ZREM HDEL EXEC, which a full Redis refuses whole (the worker died of it)."""
    client = full_redis.client()
    conn, channel = _channel(full_redis)
    try:
        _hold(client, "t1")
        full_redis.fill()
        channel.qos.ack("t1")
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    finally:
        conn.release()


def test_a_requeue_a_full_redis_refuses_stays_held_then_goes_back_once_it_has_room(full_redis):
    client = full_redis.client()
    conn, channel = _channel(full_redis)
    try:
        _hold(client, "t1")
        channel.qos._delivered["t1"] = object()
        full_redis.fill()
        channel.qos.reject("t1", requeue=True)  # no exception into the event loop
        assert client.hkeys("unacked") == [b"t1"] and client.llen("q") == 0, "still held, not lost"
        with pytest.raises(redis.OutOfMemoryError):
            channel._restore_kept()  # still full: it waits
        assert client.hkeys("unacked") == [b"t1"]
        full_redis.room()
        channel._restore_kept()
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
        (back,) = client.lrange("q", 0, -1)
        assert json.loads(back)["properties"]["delivery_tag"] == "t1"
        assert channel.qos.kept == []
    finally:
        conn.release()


def test_a_held_message_taken_again_since_is_not_moved(full_redis):
    """After the visibility timeout another worker may restore it and a third take it again (same tag, a new
    record): the early restore leaves that one alone."""
    client = full_redis.client()
    conn, channel = _channel(full_redis)
    try:
        _hold(client, "t1", score=1.0)
        full_redis.fill()
        channel.qos.reject("t1", requeue=True)
        full_redis.room()
        _hold(client, "t1", score=2.0)  # restored and taken again meanwhile
        channel._restore_kept()
        assert client.hkeys("unacked") == [b"t1"] and client.llen("q") == 0
    finally:
        conn.release()


def test_a_probe_claims_nothing_from_a_full_redis(full_redis):
    from worker.retries.schedule import RetrySchedule

    client = full_redis.client()
    schedule = RetrySchedule(client, "vdw")
    client.lpush("loops", json.dumps(kombu_envelope("q1", "loops")))
    client.zadd(schedule.key("loops"), {json.dumps(kombu_envelope("r1", "loops")): 1})
    full_redis.fill()
    with pytest.raises(redis.OutOfMemoryError):
        schedule.claim_one("loops")
    assert client.llen("loops") == 1 and client.zcard(schedule.key("loops")) == 1 and client.hlen("unacked") == 0
    schedule.ack("nothing-held")  # deletes: allowed when full
    full_redis.room()
    claimed = schedule.claim_one("loops")
    assert claimed is not None and json.loads(claimed)["properties"]["delivery_tag"] == "r1"
    assert client.zcard(schedule.key("loops")) == 0 and client.hkeys("unacked") == [b"r1"]
    full_redis.fill()
    schedule.ack("r1")
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


# -- what operators see ----------------------------------------------------------------------------------------


def test_check_fails_on_a_full_redis_and_warns_near_it(full_redis, producer_on, capsys):
    from worker.ops.cli import main

    producer_on(full_redis)
    # 16 MiB of ballast: Redis' own memory moves by tens of KiB between two INFO calls (client buffers), a few
    # per cent of an empty server's 1 MiB, which put a 93 % setting at 90 % in one CI run; of 17 MiB it is 0.2 %
    full_redis.client().set("ballast", b"x" * (16 << 20))
    assert main(["check"]) == 0
    out, err = capsys.readouterr()
    assert "redis memory: " in out and "no maxmemory" in out and not err
    full_redis.fill()
    assert main(["check"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("ok: ") and f"error: {REDIS_FULL} (" in err and "noeviction" in err
    used = full_redis.client().info("memory")["used_memory"]
    full_redis.client().config_set("maxmemory", int(used / 0.95))  # 95 %: above the warning, not full
    assert main(["check"]) == 0
    assert "warning: Redis memory above 90% of maxmemory" in capsys.readouterr().err
    full_redis.client().config_set("maxmemory-policy", "allkeys-lru")
    assert main(["check"]) == 0
    assert "warning: maxmemory-policy is allkeys-lru" in capsys.readouterr().err


def test_status_and_the_exporter_show_redis_memory_and_full(full_redis, producer_on, capsys):
    from tests.helpers import metric, metric_values
    from worker.ops.cli import main
    from worker.ops.export import registry

    producer_on(full_redis)
    full_redis.fill()
    assert main(["status", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["redis"]
    assert shown["full"] is True and shown["maxmemory"] == 1 and shown["used_memory"] > 1
    assert shown["maxmemory_policy"] == "noeviction"
    assert main(["status"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("redis: ")]
    assert "maxmemory" in line and "FULL" in line, line

    from prometheus_client import generate_latest

    values = metric_values(generate_latest(registry()).decode())
    assert metric(values, "vdw_redis_memory_max_bytes") == 1
    assert metric(values, "vdw_redis_memory_used_bytes") > 1
    full_redis.room()
    values = metric_values(generate_latest(registry()).decode())
    assert metric(values, "vdw_redis_memory_max_bytes") == 0, "0: unlimited"
    assert main(["status"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("redis: ")]
    assert "no maxmemory" in line and "FULL" not in line, line
