"""No credential anywhere: every Redis key and value, the worker and Flower logs, the dead letters, Flower's
task output and the Sentry envelopes of the whole session are scanned for the configured credentials.

Named so it runs after the other integration modules: their fixtures registered what they left behind in
``leak_watch`` (see tests/conftest.py). It also makes its own traffic designed to tempt a leak — vendors
echoing the credential in their error bodies, retries, dead letters, Sentry on, Flower watching — so the
scan is never empty, whichever tests were selected. A scan that scanned nothing fails.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import redis

import worker
from tests.helpers import wait_idle
from worker.delivery.deadletters import DeadLetterStore
from worker.dev.localstack import FlowerProcess, wait_until
from worker.settings import get_settings

from ..conftest import TEST_CREDENTIALS
from ..leaks import LeakWatch
from .test_sentry import SentryStub

pytestmark = pytest.mark.integration


def test_the_scanner_finds_a_planted_secret(product_env):
    """The scan can fail: a credential planted raw, and one inside a base64 kombu message body, are found."""
    secret = TEST_CREDENTIALS["LOOPS_API_KEY"]
    client = redis.Redis.from_url(product_env["REDIS_URL"])
    body = base64.b64encode(json.dumps([["loops", {"note": f"key {secret}"}], {}, {}]).encode()).decode()
    client.lpush("canary-queue", json.dumps({"body": body, "properties": {"body_encoding": "base64"}}))
    client.hset("canary-hash", "f", f"x{secret}y")
    client.set("canary-string", secret)
    client.sadd("canary-set", f"s{secret}")
    client.zadd("canary-zset", {f"z{secret}": 1})
    client.xadd("canary-stream", {"field": f"v{secret}"})
    client.set(f"canary-key-{secret}", "the key name itself")
    planted = ["canary-queue", "canary-hash", "canary-string", "canary-set", "canary-zset", "canary-stream",
               f"canary-key-{secret}"]
    try:
        watch = LeakWatch([secret])
        scan = watch.add_redis(product_env["REDIS_URL"], "canary")
        watch.add_text("a log line", f"Authorization: Bearer {secret}")
        hits = watch.hits()
    finally:
        client.delete(*planted)
    assert scan.keys >= len(planted)
    assert any("canary-queue" in h and "base64" in h for h in hits), hits
    for key in planted:
        assert any(key in h for h in hits), f"the planted {key} was not found: {hits}"
    assert any("a log line" in h for h in hits), hits


@pytest.fixture(scope="module")
def tempting_stack(worker_factory, base_env, tmp_path_factory, leak_watch):
    """A worker reporting to a Sentry stub, and Flower watching it."""
    stub = SentryStub()
    w = worker_factory("secrets-w", SENTRY_DSN=stub.dsn)
    log_path = tmp_path_factory.mktemp("flower-secrets") / "flower.log"
    flower = FlowerProcess(base_env, log_path, basic_auth="ops:pw")
    url = flower.url
    try:
        flower.start()
        yield w, stub, url, log_path
    finally:
        flower.stop()
        stub.server.shutdown()


@pytest.mark.timeout(600)  # its own waits and requests: about 400 s
def test_no_credential_in_redis_logs_dead_letters_flower_or_sentry(tempting_stack, leak_watch, product_env,
                                                                   sandbox_client, unique_email):
    w, sentry, flower_url, flower_log = tempting_stack
    creds = TEST_CREDENTIALS
    # Vendors that echo the credential back in their error bodies (dead letters keep the body).
    sandbox_client.configure("conveyour", fail_next=[{"status": 422, "body": {
        "error": f"bad token {creds['CONVEYOUR_TOKEN']} for app {creds['CONVEYOUR_APPKEY']}"}}])
    sandbox_client.configure("loops", fail_next=[{"status": 503, "body": {"message": f"key {creds['LOOPS_API_KEY']}"}}]
                             + [{"status": 500, "body": {"message": f"key {creds['LOOPS_API_KEY']}"}}] * 3)
    sandbox_client.configure("convertloop", fail_next=[{"status": 401, "body": {
        "error": f"invalid app_id {creds['CONVERTLOOP_APP_ID']} / key {creds['CONVERTLOOP_API_KEY']}"}}])
    # One event per failing vendor, so each vendor's injected failures all hit that event.
    ids = [worker.track("tempting", email=unique_email, properties={"n": 1}, vendors=["conveyour"]),
           worker.track("tempting", email=unique_email, properties={"n": 2}, vendors=["loops"]),
           worker.identify(email=unique_email, traits={"plan": "pro"}, vendors=["convertloop"])]
    wait_until(lambda: len(sentry.events()) >= 3, timeout=30, message="three dead letters reported to Sentry")
    ids.append(worker.segment(email=unique_email, add=["vip"]))
    wait_until(lambda: sum(1 for r in sandbox_client.requests(status=200) if unique_email in str(r["body"])) >= 3,
               timeout=30, message="a delivery to every vendor")
    wait_idle(product_env["REDIS_URL"])  # every message settled and acknowledged: its traces are all written

    def flower_tasks() -> dict:
        return httpx.get(f"{flower_url}/api/tasks", auth=("ops", "pw"), timeout=5).json()

    # Flower has taken in this test's tasks, the failures among them (the positive signal, not a sleep).
    wait_until(lambda: any(eid in key and t["state"] == "FAILURE" for eid in ids for key, t in flower_tasks().items()),
               timeout=30, interval=0.2, message="Flower to show this test's failed tasks")

    # The echoed credentials reached the product, which kept the bodies with the credentials filtered out.
    entries = [d for d in DeadLetterStore.default().list() if d.event_id in ids]
    assert sorted((d.vendor, d.reason, d.status) for d in entries) == [
        ("convertloop", "rejected", 401), ("conveyour", "rejected", 422), ("loops", "retries_exhausted", 500)]
    assert all("[Filtered]" in (d.response_body or "") for d in entries), [d.response_body for d in entries]

    tasks = flower_tasks()
    assert any(eid in key for eid in ids for key in tasks), "Flower saw none of this test's tasks"
    assert any(t["state"] == "FAILURE" for t in tasks.values())
    leak_watch.add_text("flower /api/tasks (secrets module)", json.dumps(tasks), kind="flower")
    for task_id in list(tasks)[:50]:
        info = httpx.get(f"{flower_url}/api/task/info/{task_id}", auth=("ops", "pw"), timeout=5)
        leak_watch.add_text(f"flower task {task_id}", info.text, kind="flower")
    leak_watch.add_text("sentry envelopes (secrets module)", b"\n".join(sentry.raw), kind="sentry")
    leak_watch.add_log(w.log_path)
    leak_watch.add_log(flower_log)
    scan = leak_watch.add_redis(product_env["REDIS_URL"], "redis at the end of the session")

    secrets = set(leak_watch.secrets)
    assert set(TEST_CREDENTIALS.values()) <= secrets and set(get_settings().secrets()) <= secrets
    logs = leak_watch.logs()
    log_bytes = sum(len(data) for _, data in logs)
    hits = leak_watch.hits()
    totals = {kind: n for kind, n in sorted(leak_watch.sources.items())}
    print(f"\nscanned for {len(secrets)} credentials: {len(logs)} log files ({log_bytes} bytes), "
          f"{len(leak_watch.redis_scans)} Redis snapshots ({totals.get('redis keys', 0)} keys, "
          f"{totals.get('redis', 0)} bytes, {totals.get('dead letters', 0)} dead letters), "
          f"Flower {totals.get('flower', 0)} bytes, Sentry {totals.get('sentry', 0)} bytes; hits: {len(hits)}")
    for snapshot in leak_watch.redis_scans:
        print(f"  {snapshot.label}: {snapshot.keys} keys {snapshot.types}, {snapshot.dead_letters} dead letters")

    # Nothing scanned is no proof: every kind of place must have been looked at.
    assert scan.keys > 0 and scan.dead_letters >= 3
    assert log_bytes > 0 and totals["flower"] > 0 and totals["sentry"] > 0
    assert hits == [], "credentials leaked:\n" + "\n".join(hits[:50])
