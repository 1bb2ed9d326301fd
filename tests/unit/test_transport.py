"""The hardened Redis transport survives Celery closing a lost connection twice."""

from __future__ import annotations

from kombu import Connection


def test_a_channel_keeps_its_redis_address_after_the_transport_lets_go(redis_server):
    conn = Connection(redis_server.url, transport="worker.transport:Transport")
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
