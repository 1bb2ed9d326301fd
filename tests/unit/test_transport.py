"""The hardened Redis transport survives Celery closing a lost connection twice."""

from __future__ import annotations

import pytest
from kombu import Connection


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
