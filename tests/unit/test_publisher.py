"""The publisher writes messages a Celery worker reads as it reads Celery's own, in one round trip."""

from __future__ import annotations

import json

import redis

from tests.helpers import celery_reads
from worker.broker.tasks import deliver
from worker.envelope import TaskMessages, decode_body

PAYLOAD = {"id": "e" * 32, "operation": "track", "event": "sale", "identity": {"email": "a@b.co"},
           "properties": {"amount": 5, "note": "100% \"quoted\" ünïcode"}, "created_at": "2026-01-01T00:00:00Z"}


def test_a_worker_reads_from_our_message_what_it_reads_from_apply_async(product_env, redis_server):
    """Celery's own publish of the same call (``app.amqp.as_task_v2``) and ours, each taken by kombu's stock Redis
    transport and read by Celery's strategy and trace: every field a worker, the task and Flower read is equal
    but the args summary. Ours writes a subset of Celery's headers and properties, with Celery's values: what it
    leaves out Celery writes as null or as the default the worker reads it with."""
    client = redis.Redis.from_url(redis_server.url)
    client.delete("loops")
    with deliver.app.connection_for_write(redis_server.url) as connection:  # never the app's default broker
        deliver.apply_async(args=("loops", PAYLOAD), queue="loops", task_id=f"{PAYLOAD['id']}.loops",
                            connection=connection)
    celery_raw = client.rpop("loops")
    client.close()
    ((queue, ours),) = TaskMessages().build(PAYLOAD, ["loops"])
    assert queue == "loops"
    theirs_seen, ours_seen = (celery_reads(redis_server.url, raw) for raw in (celery_raw, ours))

    assert ours_seen["seen"] == theirs_seen["seen"]
    assert ours_seen["seen"]["ignore_result"] is True  # Celery's header says the task's own; ours leaves it to the task
    assert ours_seen["received"]["args"] == "('loops', <track>)"
    assert decode_body(json.loads(ours)) == [["loops", PAYLOAD], {}, {}]

    celery_env, our_env = json.loads(celery_raw), json.loads(ours)
    assert set(our_env) < set(celery_env) and set(celery_env) - set(our_env) == {"content-encoding"}
    assert our_env["content-type"] == celery_env["content-type"] and celery_env["content-encoding"] == "utf-8"
    assert set(our_env["headers"]) < set(celery_env["headers"])
    for key in set(our_env["headers"]) - {"argsrepr"}:
        assert our_env["headers"][key] == celery_env["headers"][key], key
    left_out = {k: v for k, v in celery_env["headers"].items() if k not in our_env["headers"]}
    assert left_out == {
        "lang": "py", "shadow": None, "eta": None, "expires": None, "group": None, "group_index": None,
        "retries": 0, "timelimit": [None, None], "root_id": f"{PAYLOAD['id']}.loops", "parent_id": None,
        "kwargsrepr": "{}", "origin": left_out["origin"], "ignore_result": True, "replaced_task_nesting": 0,
        "stamped_headers": None, "stamps": {}}
    assert set(our_env["properties"]) == {"delivery_info", "delivery_tag"}
    assert our_env["properties"]["delivery_info"] == celery_env["properties"]["delivery_info"]
    assert celery_env["properties"]["body_encoding"] == "base64" and "body_encoding" not in our_env["properties"]


def test_every_message_has_its_own_task_id_and_delivery_tag(product_env):
    # product_env first: Celery reads its configuration (the broker URL) on first use, for the whole session.
    messages = TaskMessages().build(PAYLOAD, ["convertloop", "loops", "conveyour"], ".replay-1")
    envelopes = [json.loads(m) for _, m in messages]
    assert [q for q, _ in messages] == ["convertloop", "loops", "conveyour"]
    assert [e["headers"]["id"] for e in envelopes] == [f"{PAYLOAD['id']}.{v}.replay-1"
                                                       for v in ("convertloop", "loops", "conveyour")]
    assert len({e["properties"]["delivery_tag"] for e in envelopes}) == 3
    assert [e["properties"]["delivery_info"]["routing_key"] for e in envelopes] == ["convertloop", "loops", "conveyour"]
    assert [decode_body(e)[0][0] for e in envelopes] == ["convertloop", "loops", "conveyour"]
