"""Garbage in the queues never kills a worker; a dead broker never hangs a producer."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid

import pytest
import redis

import worker
from worker.delivery.deadletters import DeadLetterStore
from worker.dev.localstack import RedisServer, wait_until

pytestmark = pytest.mark.integration


def kombu_envelope(body: bytes, queue: str, task: str = "worker.deliver", task_id: str = "junk") -> bytes:
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "retries": 0, "root_id": task_id, "parent_id": None,
                    "argsrepr": "", "kwargsrepr": "", "origin": "test", "ignore_result": True},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": task_id},
    }).encode()


def valid_event(marker: str, **changes) -> dict:
    event = {"id": marker, "operation": "track", "created_at": "2026-01-01T00:00:00Z",
             "identity": {"email": f"{marker}@example.com"}, "event": "junk", "properties": {}, "occurred_at": None}
    return {**event, **changes}


def celery_body(args: list, kwargs: dict | None = None) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([args, kwargs or {}, embed]).encode()


HUGE = 5 * 1024 * 1024

#: kind -> (queue -> raw list entry, how the worker must deal with it)
#:   "quarantined": the transport cannot decode the entry; a malformed dead letter whose raw text has the marker
#:   "dead-lettered": the task sees it; a malformed dead letter with the message's task id
#:   "rejected": Celery refuses it with a log line naming it
GARBAGE = {
    "not-json": (lambda q, m: f"this is not json {m}".encode(), "quarantined"),
    "not-utf8": (lambda q, m: b"\xff\xfe" + m.encode() + b"\xff", "quarantined"),
    "json-not-envelope": (lambda q, m: json.dumps({"valid": "json", "marker": m}).encode(), "quarantined"),
    "json-list": (lambda q, m: json.dumps([m, 1, 2]).encode(), "quarantined"),
    "huge-not-json": (lambda q, m: m.encode() + b"\x00garbage" * (HUGE // 8), "quarantined"),
    "body-not-json": (lambda q, m: kombu_envelope(f"{{not json {m}".encode(), q, task_id=m), "rejected"),
    "unknown-task": (lambda q, m: kombu_envelope(celery_body([q, valid_event(m)]), q, task="no.such.task", task_id=m),
                     "rejected"),
    "too-few-args": (lambda q, m: kombu_envelope(celery_body([q]), q, task_id=m), "dead-lettered"),
    "no-args": (lambda q, m: kombu_envelope(celery_body([]), q, task_id=m), "dead-lettered"),
    "too-many-args": (lambda q, m: kombu_envelope(celery_body([q, valid_event(m), 3], {"extra": 1}), q, task_id=m),
                      "dead-lettered"),
    "unknown-vendor": (lambda q, m: kombu_envelope(celery_body(["nosuchvendor", valid_event(m)]), q, task_id=m),
                       "dead-lettered"),
    "unknown-operation": (lambda q, m: kombu_envelope(celery_body([q, valid_event(m, operation="delete")]), q,
                                                      task_id=m), "dead-lettered"),
    "missing-fields": (lambda q, m: kombu_envelope(celery_body([q, {"id": m, "operation": "track"}]), q, task_id=m),
                       "dead-lettered"),
    "event-not-object": (lambda q, m: kombu_envelope(celery_body([q, [m]]), q, task_id=m), "dead-lettered"),
    "huge-event": (lambda q, m: kombu_envelope(celery_body([q, valid_event(m, properties={"big": "x" * HUGE})]), q,
                                               task_id=m), "dead-lettered"),
}
QUEUES = ("convertloop", "loops", "conveyour")


def test_garbage_in_every_queue_is_dead_lettered_or_rejected_and_delivery_goes_on(start_worker, product_env,
                                                                                  sandbox_client, unique_email):
    """Every kind of garbage, in every vendor queue: the worker survives, keeps each as a ``malformed`` dead
    letter (or Celery rejects it with a log line), never sends it to a vendor, and goes on delivering."""
    w = start_worker("hostile-w")
    r = redis.Redis.from_url(product_env["REDIS_URL"])
    run = uuid.uuid4().hex[:8]
    marker = {(kind, q): f"junk-{run}-{kind}-{q}" for kind in GARBAGE for q in QUEUES}
    for (kind, q), m in marker.items():
        r.lpush(q, GARBAGE[kind][0](q, m))
    # Valid traffic queued behind the garbage.
    worker.track("still-alive", email=unique_email)

    store = DeadLetterStore.default()

    def entries_for(m: str) -> list:
        return [d for d in store.list() if d.task_id == m or m in (d.raw or "")]

    expected = {key: GARBAGE[key[0]][1] for key in marker}
    dead_lettered = {key for key, how in expected.items() if how != "rejected"}

    def missing() -> list:
        return sorted(key for key in dead_lettered if not entries_for(marker[key]))

    try:
        wait_until(lambda: not missing(), timeout=60, interval=0.25,
                   message="a dead letter for every malformed message")
    except AssertionError:
        raise AssertionError(f"no dead letter for {missing()}; worker alive: {w.proc.poll() is None}; "
                             f"log tail:\n{w.log()[-3000:]}") from None
    wait_until(lambda: len([x for x in sandbox_client.requests(status=200) if unique_email in str(x["body"])]) == 3,
               timeout=20, message="valid traffic after the garbage")
    wait_until(lambda: all(r.llen(q) == 0 for q in QUEUES) and r.hlen("unacked") == 0, timeout=20,
               message="every queue consumed and nothing left held")
    assert w.proc.poll() is None, "the worker died"

    log = w.log()
    report = []
    for key, how in sorted(expected.items()):
        m = marker[key]
        found = entries_for(m)
        if how == "rejected":
            assert not found, f"{key} was dead-lettered; Celery should reject it"
            assert m in log, f"{key}: no log line names it"
            report.append(f"{key[0]:18} {key[1]:12} rejected (log)")
            continue
        assert len(found) == 1, f"{key}: {len(found)} dead letters"
        (entry,) = found
        assert entry.reason == "malformed" and not entry.replayable, (key, entry.reason)
        # The vendor the message named (a message naming none is filed under "None"), else the queue's.
        named = {"unknown-vendor": "nosuchvendor", "no-args": "None"}.get(key[0], key[1])
        assert entry.vendor == named, (key, entry.vendor)
        assert len(entry.raw or "") <= 4096 and len(entry.model_dump_json()) < 16_384
        if how == "dead-lettered":
            assert entry.task_id == m
        report.append(f"{key[0]:18} {key[1]:12} dead letter: {entry.error[:70]}")
    assert not [x for x in sandbox_client.requests() if f"junk-{run}" in str(x["body"])], "garbage reached a vendor"
    assert "Unrecoverable error" not in log
    print(f"\n{len(marker)} malformed messages:\n" + "\n".join(report))


PRODUCER_SCRIPT = """
import json, sys, time
import worker
worker.track("ok", email="a@b.co")          # the broker is up, the connection pooled
print("ready", flush=True)
sys.stdin.readline()                        # the test stops Redis now
results = []
for _ in range(5):
    start = time.monotonic()
    try:
        worker.track("lost?", email="a@b.co")
        results.append(["accepted", time.monotonic() - start])
    except Exception as exc:
        results.append([type(exc).__name__ + ": " + str(exc), time.monotonic() - start])
print(json.dumps(results), flush=True)
"""


def test_dead_broker_without_spool_fails_with_enqueue_error(product_env):
    server = RedisServer().start()
    env = {**product_env, "REDIS_URL": server.url, "SPOOL_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER_SCRIPT], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        server.stop()
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        server.stop()
        proc.kill()
    results = json.loads(out.strip().splitlines()[-1])
    print("\n".join(f"{outcome[:60]:60} {elapsed * 1000:7.1f} ms" for outcome, elapsed in results))
    assert all(outcome.startswith("EnqueueError: could not enqueue track event") for outcome, _ in results), results
    assert all("broker unreachable" in outcome and "SPOOL_ENABLED=false" in outcome for outcome, _ in results)
    # How fast each call failed is printed above, not asserted: the benchmark (tests/benchmarks/outage.py)
    # measures it against PUBLISH_TIMEOUT (0.25 s) on a quiet machine.
