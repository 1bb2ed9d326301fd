"""The asyncio producer API: the blocking API's validation, ids and messages; the loop keeps running while
Redis is refused or hangs; the spool is written off the loop; a cancelled caller's event is not lost. And
misconfiguration is loud: no vendor enabled is a ConfigurationError (calls, startup check, ``worker check``)
unless ALLOW_NO_VENDORS=true."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest
import redis

import worker
from worker.dev.localstack import RedisServer, free_port, wait_until
from worker.envelope import decode_body
from worker.producer import api as producer
from worker.producer.publisher import Publisher
from worker.producer.spool import Spool
from worker.settings import get_settings
from worker.vendors import VENDORS


def _queued(client: redis.Redis) -> dict[str, list[dict]]:
    """Pop every message off the vendor queues, decoded (envelope with its body as JSON)."""
    out: dict[str, list[dict]] = {}
    for vendor in VENDORS:
        for raw in reversed(client.lrange(vendor, 0, -1)):
            envelope = json.loads(raw)
            envelope["body"] = decode_body(envelope)
            out.setdefault(vendor, []).append(envelope)
        client.delete(vendor)
    return out


@pytest.fixture
def queues(product_env, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.delete(*VENDORS)
    yield client
    client.delete(*VENDORS)
    client.close()


def test_the_same_call_writes_the_same_messages_blocking_or_async(queues):
    prepared = producer.prepare_track("made_sale", email="jill@acme.co", properties={"amount": 1000})
    assert producer.send(prepared) == prepared.id
    blocking = _queued(queues)
    assert asyncio.run(worker.aio.send(prepared)) == prepared.id
    in_asyncio = _queued(queues)

    assert sorted(blocking) == sorted(in_asyncio) == sorted(VENDORS)
    for vendor in VENDORS:
        (ours,), (theirs,) = blocking[vendor], in_asyncio[vendor]
        # Each message has its own delivery tag (kombu's); everything else is byte for byte the same.
        assert ours["properties"].pop("delivery_tag") != theirs["properties"].pop("delivery_tag")
        assert ours == theirs
        assert ours["headers"]["id"] == f"{prepared.id}.{vendor}"


def test_each_async_call_fans_out_and_returns_its_id(queues):
    async def calls():
        return await asyncio.gather(
            worker.aio.identify(email="jill@acme.co", traits={"plan": "pro"}),
            worker.aio.track("signed_up", email="jill@acme.co"),
            worker.aio.segment(email="jill@acme.co", add=["vip"], vendors=["loops", "conveyour"]),
        )

    identify_id, track_id, segment_id = asyncio.run(calls())
    got = _queued(queues)
    ids = {vendor: [m["headers"]["id"] for m in messages] for vendor, messages in got.items()}
    assert sorted(ids["convertloop"]) == sorted([f"{identify_id}.convertloop", f"{track_id}.convertloop"])
    for vendor in ("loops", "conveyour"):
        assert sorted(ids[vendor]) == sorted(f"{e}.{vendor}" for e in (identify_id, track_id, segment_id))
    assert len({identify_id, track_id, segment_id}) == 3


@pytest.mark.parametrize(("call", "message"), [
    (lambda: worker.aio.track("", email="j@a.co"), "event name"),
    (lambda: worker.aio.track("x", email="j@a.co", properties={"n": float("nan")}), "NaN"),
    (lambda: worker.aio.identify(traits={"a": 1}), "identity is required"),
    (lambda: worker.aio.segment(email="j@a.co", add="vip"), "list of segment names"),
    (lambda: worker.aio.track("x", email="j@a.co", vendors=["mailchimp"]), "unknown vendor"),
])
def test_bad_input_raises_invalid_event_and_enqueues_nothing(queues, call, message):
    with pytest.raises(worker.InvalidEvent, match=message):
        asyncio.run(call())
    assert _queued(queues) == {}


def test_short_lived_loops_leave_no_connection_behind(queues):
    """asyncio.run per call (as asgiref runs a Django async view under WSGI): each loop's connection closes
    with the loop, not whenever the garbage collector finds it."""
    import gc
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    asyncio.run(worker.aio.track("warm_up", email="j@a.co"))
    gc.disable()
    try:
        before = open_fds()
        for i in range(20):
            asyncio.run(worker.aio.track("one_loop_each", email=f"u{i}@a.co"))
        after = open_fds()
    finally:
        gc.enable()
    assert after <= before, f"{after - before} file descriptors left open by 20 event loops"
    assert len(_queued(queues)["loops"]) == 21


# -- Redis away -------------------------------------------------------------------


@pytest.fixture
def outage_env(product_env, monkeypatch, tmp_path):
    """The producer pointed at ``point_at(url)``'s Redis, with its own spool; the default publisher reset."""
    def point_at(url: str) -> Spool:
        monkeypatch.setenv("REDIS_URL", url)
        monkeypatch.setenv("SPOOL_DIR", str(tmp_path / "spool"))
        monkeypatch.setenv("PUBLISH_TIMEOUT", "0.25")
        get_settings.cache_clear()
        Publisher.reset_default()
        return Spool(tmp_path / "spool", 1 << 20)

    yield point_at
    Publisher.reset_default()


@pytest.fixture
def hung_redis():
    """A loopback port that accepts connections (the kernel does) and never answers: a hung Redis."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"redis://127.0.0.1:{s.getsockname()[1]}/0"


async def _while_ticking(coro):
    """Run ``coro`` while a ticker counts the loop's turns; returns (result, turns taken while it ran)."""
    turns = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal turns
        while not done.is_set():
            await asyncio.sleep(0)
            turns += 1

    tick = asyncio.create_task(ticker())
    try:
        return await coro, turns
    finally:
        done.set()
        await tick


def test_a_hung_redis_never_blocks_the_loop_and_the_event_is_spooled(outage_env, hung_redis, monkeypatch):
    spool = outage_env(hung_redis)
    put_threads: list[int] = []
    real_put = Spool.put
    monkeypatch.setattr(Spool, "put", lambda self, *a: (put_threads.append(threading.get_ident()),
                                                         real_put(self, *a))[1])

    async def scenario():
        loop_thread = threading.get_ident()
        event_id, turns = await _while_ticking(worker.aio.track("signed_up", email="jill@acme.co"))
        return loop_thread, event_id, turns

    loop_thread, event_id, turns = asyncio.run(scenario())
    # The call waited on Redis (an attempt's timeout) and on the spool's thread: the loop ran meanwhile.
    assert turns > 0, "the event loop made no progress while the call waited on a hung Redis"
    assert put_threads and loop_thread not in put_threads, "the spool file was written on the event loop"
    assert spool.pending() == 1
    (entry,) = [json.loads(p.read_text()) for p in spool.directory.glob("*.json")]
    assert entry["event_id"] == event_id
    assert sorted(m[0] for m in entry["messages"] if m[0]) == sorted(VENDORS)


def test_a_refused_redis_spools_every_call_and_the_flusher_publishes_them(outage_env):
    server = RedisServer().start()
    try:
        spool = outage_env(server.url)
        server.stop(keep_data=True)  # refused

        async def calls():
            return await asyncio.gather(*(worker.aio.track("sale", email=f"u{i}@example.com") for i in range(5)))

        ids = asyncio.run(calls())
        assert spool.pending() == 5
        server.start()  # back on the same port: the process's flusher thread publishes the spool
        wait_until(lambda: spool.pending() == 0, timeout=30, message="the flusher to drain the spool")
        got = _queued(redis.Redis.from_url(server.url))
        assert sorted(m["headers"]["id"] for m in got["loops"]) == sorted(f"{e}.loops" for e in ids)
    finally:
        server.stop()


def test_a_cancelled_caller_still_gets_its_event_spooled(outage_env, hung_redis, monkeypatch):
    spool = outage_env(hung_redis)
    from worker.producer.publisher_async import AsyncPublisher

    started = asyncio.Event()
    real_publish = AsyncPublisher.publish

    async def publish(self, *args, **kwargs):
        started.set()
        return await real_publish(self, *args, **kwargs)

    monkeypatch.setattr(AsyncPublisher, "publish", publish)

    async def scenario():
        call = asyncio.create_task(worker.aio.track("signed_up", email="jill@acme.co"))
        await started.wait()  # the publish is under way (a positive signal, not a sleep), waiting on the hung Redis
        await asyncio.sleep(0)  # ...and its caller waits for it
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The publish carries on without its caller: wait for it (the loop must keep running for that).
        while worker.aio._orphans:
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert spool.pending() == 1


def test_spool_off_and_redis_away_raises_enqueue_error(outage_env, monkeypatch):
    outage_env(f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("SPOOL_ENABLED", "false")
    get_settings.cache_clear()
    Publisher.reset_default()
    with pytest.raises(worker.EnqueueError, match="SPOOL_ENABLED=false"):
        asyncio.run(worker.aio.track("x", email="j@a.co"))


# -- no vendor enabled --------------------------------------------------------------


@pytest.fixture
def no_vendors(product_env, monkeypatch, queues):
    for key in list(product_env):
        if key.startswith(("CONVERTLOOP_", "LOOPS_", "CONVEYOUR_")):
            monkeypatch.delenv(key, raising=False)
    get_settings.cache_clear()
    return queues


@pytest.mark.parametrize("call", [
    lambda: worker.track("signed_up", email="j@a.co"),
    lambda: worker.identify(email="j@a.co"),
    lambda: asyncio.run(worker.aio.segment(email="j@a.co", add=["vip"])),
])
def test_no_vendor_enabled_is_a_clear_error(no_vendors, call):
    with pytest.raises(worker.ConfigurationError) as info:
        call()
    text = str(info.value)
    for variable in ("CONVERTLOOP_APP_ID", "LOOPS_API_KEY", "CONVEYOUR_APPKEY", "ALLOW_NO_VENDORS"):
        assert variable in text
    assert _queued(no_vendors) == {}


def test_allow_no_vendors_lets_events_go_nowhere_with_a_warning(no_vendors, monkeypatch, caplog):
    monkeypatch.setenv("ALLOW_NO_VENDORS", "true")
    get_settings.cache_clear()
    event_id = worker.track("signed_up", email="j@a.co")
    async_id = asyncio.run(worker.aio.track("signed_up", email="j@a.co"))
    assert len(event_id) == len(async_id) == 32 and event_id != async_id
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(event_id in m and "ALLOW_NO_VENDORS" in m for m in warned), warned
    assert _queued(no_vendors) == {}


def test_check_configuration_at_startup(no_vendors, monkeypatch):
    with pytest.raises(worker.ConfigurationError, match="LOOPS_API_KEY"):
        worker.check_configuration()
    monkeypatch.setenv("ALLOW_NO_VENDORS", "true")
    get_settings.cache_clear()
    assert worker.check_configuration() == []
    monkeypatch.setenv("LOOPS_API_KEY", "k")
    get_settings.cache_clear()
    assert worker.check_configuration() == ["loops"]


def test_bad_input_is_still_invalid_event_when_no_vendor_is_enabled(no_vendors):
    with pytest.raises(worker.InvalidEvent):
        worker.track("", email="j@a.co")


def test_the_check_command_names_the_vendors_or_fails_without_one(no_vendors, product_env, capsys, monkeypatch):
    from worker.ops.cli import main

    assert main(["check", "--timeout", "5"]) == 2
    assert "no vendor is enabled" in capsys.readouterr().err
    monkeypatch.setenv("LOOPS_API_KEY", "k")
    get_settings.cache_clear()
    assert main(["check", "--timeout", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok: redis://127.0.0.1:") and out[1] == "vendors: loops"
