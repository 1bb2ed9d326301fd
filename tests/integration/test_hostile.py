"""Garbage in the queues never kills a worker; a dead broker never hangs a producer."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
import redis

import worker
from worker.deadletters import DeadLetterStore
from worker.localstack import RedisServer, wait_until

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


def test_malformed_messages_are_dead_lettered_and_delivery_goes_on(worker_factory, product_env, sandbox_client, unique_email):
    w = worker_factory("hostile-w")
    r = redis.Redis.from_url(product_env["REDIS_URL"])
    r.lpush("loops", b"this is not json")
    r.lpush("conveyour", b"\xff\xfe not utf-8")
    r.lpush("convertloop", b"{\"valid\": \"json, no envelope\"}")
    r.lpush("loops", kombu_envelope(b"{not json either", "loops", task_id="junk-1"))
    r.lpush("convertloop", kombu_envelope(json.dumps([["loops"], {}, {}]).encode(), "convertloop", task_id="junk-2"))
    r.lpush("conveyour", kombu_envelope(json.dumps([["conveyour", {"id": "x"}, 3], {"extra": 1}, {}]).encode(),
                                        "conveyour", task_id="junk-3"))
    r.lpush("loops", kombu_envelope(json.dumps([["nosuchvendor", {"id": "x"}], {}, {}]).encode(), "loops", task_id="junk-4"))
    r.lpush("loops", kombu_envelope(json.dumps([[], {}, {}]).encode(), "loops", task="no.such.task", task_id="junk-5"))
    worker.app.send_task("worker.deliver", args=("loops", {"id": "x" * 100_000, "operation": "track"}), queue="loops",
                         task_id="junk-6")

    store = DeadLetterStore.default()
    junk = {"junk-2", "junk-3", "junk-4", "junk-6"}
    entries = wait_until(lambda: (found := [d for d in store.list() if d.task_id in junk]) and len(found) == 4 and found,
                         timeout=20, message="malformed dead letters")
    assert {d.reason for d in entries} == {"malformed"}
    assert all(len(d.raw or "") <= 4096 for d in entries)

    worker.track("still-alive", email=unique_email)
    wait_until(lambda: len([x for x in sandbox_client.requests(status=200) if unique_email in str(x["body"])]) == 3,
               timeout=20, message="valid traffic after the garbage")
    assert w.proc.poll() is None, "the worker died"
    log = w.log()
    assert "no.such.task" in log  # rejected with a log line
    assert "not json" in log or "decode" in log.lower()


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


def test_dead_broker_without_spool_fails_fast_with_enqueue_error(product_env):
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
    assert max(elapsed for _, elapsed in results) < 1.0
