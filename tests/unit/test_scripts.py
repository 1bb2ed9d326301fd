"""Lua script calls made later or together (worker/scripts.py), and the consumer's acknowledgements that use
them: on the event loop's thread the acknowledgements of one loop turn go in one round trip (worker/broker/
transport.py QoS)."""

from __future__ import annotations

import threading

import redis
from kombu import Connection
from kombu.transport import virtual

from worker.broker import transport
from worker.scripts import ScriptCall, run_together

PUSH = "redis.call('RPUSH', KEYS[1], ARGV[1]); return ARGV[1]"
FAIL = "return redis.error_reply('refused ' .. ARGV[1])"


def checkouts(client: redis.Redis) -> list[int]:
    """Counts the client's connection checkouts: one per round trip (a command alone, or a pipeline)."""
    count = [0]
    get = client.connection_pool.get_connection

    def counted(*args, **kwargs):
        count[0] += 1
        return get(*args, **kwargs)

    client.connection_pool.get_connection = counted
    return count


def test_calls_made_together_reply_in_order_in_one_round_trip_each_failure_its_own(client, prefix):
    push, fail = client.register_script(PUSH), client.register_script(FAIL)
    calls = [ScriptCall(push, [f"{prefix}:l"], ["a"]), ScriptCall(fail, [], ["b"]),
             ScriptCall(push, [f"{prefix}:l"], ["c"])]
    client.script_load(PUSH), client.script_load(FAIL)  # known to Redis (else each is loaded, alone)
    count = checkouts(client)
    replies = run_together(calls)
    assert count[0] == 1
    assert replies[0] == b"a" and replies[2] == b"c"
    assert isinstance(replies[1], redis.ResponseError) and "refused b" in str(replies[1])
    assert client.lrange(f"{prefix}:l", 0, -1) == [b"a", b"c"]


def test_a_script_redis_no_longer_has_is_loaded_and_its_call_made_again(client, prefix):
    push = client.register_script(PUSH)
    push(keys=[f"{prefix}:l"], args=["before"])
    client.script_flush()  # as after a Redis restart
    assert run_together([ScriptCall(push, [f"{prefix}:l"], ["after"])]) == [b"after"]
    assert client.lrange(f"{prefix}:l", 0, -1) == [b"before", b"after"]


class Loop:
    """What the QoS uses of kombu's event loop: callbacks handed to it run on its next turn."""

    def __init__(self) -> None:
        self.soon: list = []

    def call_soon(self, fun, *args):
        self.soon.append(fun)

    def turn(self) -> None:
        todo, self.soon = self.soon, []
        for fun in todo:
            fun()


def test_on_the_event_loops_thread_a_turns_acknowledgements_go_together_and_a_failed_one_stays_held(
        redis_server, client, prefix):
    conn = Connection(redis_server.url, transport="worker.broker.transport:Transport")
    loop = Loop()
    try:
        channel = conn.channel()
        conn.transport._loop, conn.transport._loop_thread = loop, threading.get_ident()
        qos = channel.qos
        push, fail = client.register_script(PUSH), client.register_script(FAIL)
        client.script_load(PUSH), client.script_load(FAIL)  # known to Redis (else each is loaded, alone)
        tags = [f"{prefix}-{i}" for i in range(4)]
        for tag in tags:
            virtual.QoS.append(qos, object(), tag)  # taken (the take recorded it: local state only)
            client.hset(channel.unacked_key, tag, "{}")  # a held message's record
        for tag in tags[:3]:
            transport.ack_with(tag, ScriptCall(push, [f"{prefix}:acked"], [tag]))
        transport.ack_with(tags[3], ScriptCall(fail, [], [tags[3]]))
        for tag in tags:
            qos.ack(tag)
        assert client.lrange(f"{prefix}:acked", 0, -1) == [] and len(loop.soon) == 1  # nothing sent yet
        count = checkouts(client)
        loop.turn()
        assert count[0] == 1  # one round trip for the turn's four acknowledgements (and no more)
        assert client.lrange(f"{prefix}:acked", 0, -1) == [t.encode() for t in tags[:3]]
        assert [tag for tag, _ in qos.kept] == [tags[3]]  # refused: held in Redis, delivered again
        qos._flush()
        assert not qos._delivered  # every one settled here
        # Shutting down with an acknowledgement gathered and not sent: it is made, not restored.
        virtual.QoS.append(qos, object(), f"{prefix}-last")
        transport.ack_with(f"{prefix}-last", ScriptCall(push, [f"{prefix}:acked"], [f"{prefix}-last"]))
        qos.ack(f"{prefix}-last")
        qos.restore_unacked_once()
        assert client.lrange(f"{prefix}:acked", -1, -1) == [f"{prefix}-last".encode()]
    finally:
        conn.transport._loop = conn.transport._loop_thread = None
        conn.release()
        client.delete(channel.unacked_key, channel.unacked_index_key)
