"""The hardened Redis transport survives Celery closing a lost connection twice."""

from __future__ import annotations

import pytest
from kombu import Connection

from tests.helpers import kombu_envelope


def test_a_channel_keeps_its_redis_address_after_the_transport_lets_go(redis_server):
    conn = Connection(redis_server.url, transport="worker.broker.transport:Transport")
    channel = conn.channel()
    try:
        # What Connection.collect() does when Celery handles a lost broker connection ...
        conn.transport.client = None
        # ... after which Celery's close() restores unacked messages through a new pool: stock kombu raises
        # AttributeError("'NoneType' object has no attribute 'hostname'") here and the worker exits.
        params = channel._connparams()
        assert (params["host"], params["port"]) == ("127.0.0.1", redis_server.port)
        channel.qos.restore_unacked_once()
        channel.close()
    finally:
        conn.release()


def test_a_message_popped_as_redis_goes_away_goes_back_on_its_queue(redis_server, monkeypatch):
    """BRPOP took it, then recording it as unacked failed: stock kombu would lose it."""
    import json

    import pytest
    import redis
    from kombu.transport import redis as kombu_redis

    from worker.broker import transport

    envelope = {"body": "e30=", "headers": {"id": "lost-1"}, "properties": {"delivery_info": {}},
                "content-type": "application/json"}

    def redis_gone(self, message, queue):
        raise redis.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(kombu_redis.Transport, "_deliver", redis_gone)
    conn = Connection(redis_server.url, transport="worker.broker.transport:Transport")
    try:
        with pytest.raises(redis.ConnectionError):
            conn.transport._deliver(envelope, "orphans-q")
    finally:
        conn.release()
    client = redis.Redis.from_url(redis_server.url)
    client.delete("orphans-q")
    transport._requeue_orphans(client)
    assert [json.loads(m) for m in client.lrange("orphans-q", 0, -1)] == [envelope]
    transport._requeue_orphans(client)  # once only
    assert client.llen("orphans-q") == 1
    client.delete("orphans-q")


def test_the_installed_kombu_is_one_the_transport_knows(monkeypatch):
    import kombu
    from kombu.transport import redis as kombu_redis

    from worker.broker.transport import check_kombu

    check_kombu()
    monkeypatch.setattr(kombu, "__version__", "5.6.2")
    with pytest.raises(RuntimeError, match=r"kombu 5.6.2 is installed.*>=5.7,<5.8"):
        check_kombu()
    monkeypatch.setattr(kombu, "__version__", "5.7.1")
    monkeypatch.delattr(kombu_redis.Channel, "_flush_brpop_reauth")
    with pytest.raises(RuntimeError, match="missing: _flush_brpop_reauth"):
        check_kombu()


def test_a_channel_of_several_queues_watches_briefly_while_the_gate_leaves_it_one(redis_server):
    """A worker of one queue waits for it as long as BRPOP would; one whose other queues the gate stopped (a pause, a
    hold, the bulkhead) watches the one left for WATCH_EACH only, so a queue given back is taken at once."""
    from types import SimpleNamespace

    from worker.broker import transport

    def watch(consume: list[str], cancel: list[str]) -> list:
        conn = Connection(redis_server.url, transport="worker.broker.transport:Transport")
        try:
            channel = conn.channel()
            for q in consume:
                channel.basic_consume(q, no_ack=False, callback=lambda m: None, consumer_tag=f"t-{q}")
            for q in cancel:
                channel.basic_cancel(f"t-{q}")
            assert channel.active_queues == [q for q in consume if q not in cancel]
            sent: list = []
            channel.client.connection = SimpleNamespace(send_command=lambda *args: sent.append(args))
            channel._pending = "empty"  # the last take found every queue empty
            try:
                channel._brpop_start()
            finally:
                channel.client.connection, channel._in_poll = None, None
            return list(sent[0])
        finally:
            conn.release()

    assert watch(["loops"], []) == ["BLMOVE", "loops", "loops", "RIGHT", "RIGHT", 1]
    assert watch(["loops", "convertloop"], ["convertloop"]) == \
        ["BLMOVE", "loops", "loops", "RIGHT", "RIGHT", transport.WATCH_EACH]


def _message(tag: str, queue: str) -> str:
    import json

    return json.dumps(kombu_envelope(tag, queue))


def test_a_take_brings_up_to_its_most_each_queue_in_turn_and_within_its_room(redis_server):
    """One round trip takes several messages: oldest first, one queue's then the next's in turn, never more of a
    queue than its room (the bulkhead's) except the first message, each recorded as held as it is popped."""
    import json

    from worker.broker.transport import take_args

    client = redis_server.client()
    queues = ["tb-a", "tb-b"]
    unacked = ("tb-unacked", "tb-unacked-index")

    def fill(counts: dict[str, int]) -> None:
        client.delete(*queues, *unacked)
        for q, n in counts.items():
            for i in range(n):
                client.lpush(q, _message(f"{q}-{i}", q))  # kombu's publish: LPUSH, taken from the tail

    def take(most: int, rooms: list | None = None) -> list[str]:
        reply = client.execute_command(*take_args(queues, queues, *unacked, most, rooms)) or []
        assert all(recorded == 1 for _, _, recorded, *_ in reply)
        return [json.loads(m)["properties"]["delivery_tag"] for _, m, _, *_ in reply]

    fill({"tb-a": 10, "tb-b": 10})
    assert take(5) == ["tb-a-0", "tb-b-0", "tb-a-1", "tb-b-1", "tb-a-2"]
    assert sorted(k.decode() for k in client.hkeys(unacked[0])) == sorted(["tb-a-0", "tb-a-1", "tb-a-2", "tb-b-0",
                                                                           "tb-b-1"])
    assert client.zcard(unacked[1]) == 5 and client.llen("tb-a") == 7 and client.llen("tb-b") == 8
    assert take(20) == [t for i in range(7) for t in (f"tb-a-{i + 3}", f"tb-b-{i + 2}")] + ["tb-b-9"]
    assert client.hlen(unacked[0]) == 20

    fill({"tb-a": 10, "tb-b": 3})
    assert take(16, [2, None]) == ["tb-a-0", "tb-b-0", "tb-a-1", "tb-b-1", "tb-b-2"]
    fill({"tb-a": 10, "tb-b": 3})
    assert take(16, [0, 0]) == ["tb-a-0"], "the first message is taken whatever the room: as one take always was"
    fill({})
    assert client.execute_command(*take_args(queues, queues, *unacked, 16)) is None
    client.delete(*queues, *unacked)


def test_a_take_of_several_hands_on_every_good_message_around_a_malformed_one(redis_server, monkeypatch):
    from worker.broker import transport

    quarantined: list[tuple[str, str]] = []
    monkeypatch.setattr(transport, "quarantine", lambda queue, raw, error: quarantined.append((queue, raw)))
    client = redis_server.client()
    client.delete("tb-m")
    for entry in [_message("m-0", "tb-m"), "not json {", _message("m-2", "tb-m"), '{"no": "envelope"}',
                  _message("m-4", "tb-m")]:
        client.lpush("tb-m", entry)
    conn = Connection(redis_server.url, transport="worker.broker.transport:Transport")
    got: list[str] = []
    try:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=16)
        channel.basic_consume("tb-m", no_ack=False, consumer_tag="tb-m",
                              callback=lambda message: got.append(message.delivery_tag))
        while len(got) < 3:
            conn.drain_events(timeout=5)
        assert got == ["m-0", "m-2", "m-4"]
        assert [raw for _, raw in quarantined] == ["not json {", '{"no": "envelope"}']
        assert client.llen("tb-m") == 0
        assert sorted(client.hkeys(channel.unacked_key)) == [b"m-0", b"m-2", b"m-4"]
    finally:
        conn.release()
        client.delete("tb-m")
