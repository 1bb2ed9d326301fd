"""A full Redis (maxmemory reached, noeviction) is named for what it is and survived.

Each test runs its own redis-server and fills it with ``CONFIG SET maxmemory 1`` (below any use): Redis then
refuses every command that adds memory with ``OOM command not allowed`` (redis-py's ``OutOfMemoryError``),
answers reads and deletes, and runs a script whose first write frees memory.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from worker.localstack import RedisServer, wait_until
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
    from worker.publisher import Publisher
    from worker.settings import get_settings

    def point(server: RedisServer, **env: str) -> None:
        monkeypatch.setenv("REDIS_URL", server.url)
        monkeypatch.setenv("SPOOL_DIR", str(tmp_path / "spool"))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        Publisher.reset_default()

    yield point
    Publisher.reset_default()
    get_settings.cache_clear()


# -- the producer --------------------------------------------------------------------------------------------


def test_a_full_redis_spools_the_event_and_the_log_says_redis_is_full(full_redis, producer_on, caplog):
    import worker
    from worker.publisher import Publisher

    producer_on(full_redis)
    full_redis.fill()
    with caplog.at_level(logging.WARNING, logger="worker.publisher"):
        event_id = worker.track("sale", email="a@example.com", properties={"amount": 1})
    assert event_id
    spool = Publisher.default().spool
    assert spool is not None and spool.pending() == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "worker.publisher"]
    assert any(line.startswith(f"{REDIS_FULL}, spooling events to ") and "until it has room" in line
               for line in lines), lines
    assert not any("broker unreachable" in line for line in lines), lines
    assert full_redis.client().llen("loops") == 0


def test_the_flusher_keeps_trying_until_redis_has_room(full_redis, producer_on, caplog):
    import worker
    from worker.publisher import Publisher

    producer_on(full_redis)
    full_redis.fill()
    ids = [worker.track("sale", email=f"{i}@example.com", vendors=["loops"]) for i in range(3)]
    publisher = Publisher.default()
    assert publisher.spool is not None and publisher.spool.pending() == 3
    assert publisher.flush_once() is False, "Redis answers PING but refuses the write: not flushed"
    assert publisher.spool.pending() == 3 and REDIS_FULL in publisher.cause()
    with caplog.at_level(logging.WARNING, logger="worker.publisher"):
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
    from worker.publisher import Publisher

    producer_on(full_redis)
    full_redis.fill()

    async def call() -> str:
        return await worker.aio.track("sale", email="a@example.com", vendors=["loops"])

    with caplog.at_level(logging.WARNING, logger="worker.publisher"):
        assert asyncio.run(call())
    spool = Publisher.default().spool
    assert spool is not None and spool.pending() == 1
    assert REDIS_FULL in caplog.text
