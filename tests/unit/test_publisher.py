"""The publisher writes the messages Celery itself would write, in one round trip."""

from __future__ import annotations

import base64
import json

import redis

from worker.broker.tasks import deliver
from worker.envelope import TaskMessages

PAYLOAD = {"id": "e" * 32, "operation": "track", "event": "sale", "identity": {"email": "a@b.co"},
           "properties": {"amount": 5, "note": "100% \"quoted\" ünïcode"}, "created_at": "2026-01-01T00:00:00Z"}


def _decode(raw: bytes) -> tuple[dict, list]:
    envelope = json.loads(raw)
    assert envelope["properties"]["body_encoding"] == "base64"
    return envelope, json.loads(base64.b64decode(envelope["body"]))


def test_messages_match_what_apply_async_writes(product_env, redis_server):
    """Same envelope, headers and body as Celery's own publish, except per-message ids."""
    client = redis.Redis.from_url(redis_server.url)
    client.delete("loops")
    with deliver.app.connection_for_write(redis_server.url) as connection:  # never the app's default broker
        deliver.apply_async(args=("loops", PAYLOAD), queue="loops", task_id=f"{PAYLOAD['id']}.loops",
                            connection=connection)
    celery_env, celery_body = _decode(client.rpop("loops"))
    ((queue, ours),) = TaskMessages().build(PAYLOAD, ["loops"])
    our_env, our_body = _decode(ours)

    assert queue == "loops"
    assert our_body == celery_body == [["loops", PAYLOAD], {}, celery_body[2]]
    assert set(our_env) == set(celery_env)
    assert set(our_env["headers"]) == set(celery_env["headers"])
    for key in ("task", "id", "root_id", "retries", "eta", "expires", "lang", "timelimit"):
        assert our_env["headers"][key] == celery_env["headers"][key], key
    assert our_env["headers"]["argsrepr"] == f"('loops', <track {PAYLOAD['id']}>)"
    # reply_to names a result consumer; results are ignored here, so ours leaves it empty.
    differ = ("delivery_tag", "reply_to")
    props = {k: v for k, v in our_env["properties"].items() if k not in differ}
    assert props == {k: v for k, v in celery_env["properties"].items() if k not in differ}


def test_every_message_has_its_own_task_id_and_delivery_tag(product_env):
    # product_env first: Celery reads its configuration (the broker URL) on first use, for the whole session.
    messages = TaskMessages().build(PAYLOAD, ["convertloop", "loops", "conveyour"], ".replay-1")
    envelopes = [_decode(m)[0] for _, m in messages]
    assert [q for q, _ in messages] == ["convertloop", "loops", "conveyour"]
    assert [e["headers"]["id"] for e in envelopes] == [f"{PAYLOAD['id']}.{v}.replay-1"
                                                       for v in ("convertloop", "loops", "conveyour")]
    assert len({e["properties"]["delivery_tag"] for e in envelopes}) == 3
    assert [e["properties"]["delivery_info"]["routing_key"] for e in envelopes] == ["convertloop", "loops", "conveyour"]
