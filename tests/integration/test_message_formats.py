"""Messages written before compact messages still deliver after an upgrade, next to compact ones.

A real worker of the current code runs against messages in the format producers and workers wrote before
(``tests/legacy_messages.py``: every header Celery writes, a base64 body, the event with its nulls, the retry
header as a mapping): queued in their person's order, waiting on the retry schedule, failing and retried
(the retry then written compact), and parking the person's next call behind them. Assertions are on what
the sandbox received and on the dead letters, never on timing.
"""

from __future__ import annotations

import json
import time

import pytest
import redis

import worker
from tests.helpers import wait_idle
from tests.legacy_messages import queue_legacy, schedule_legacy_retry
from worker.delivery.deadletters import DeadLetterStore
from worker.delivery.ordering import PersonLog
from worker.dev.localstack import wait_until
from worker.producer.api import prepare_track

pytestmark = pytest.mark.integration

VENDORS = ["convertloop", "loops", "conveyour"]


def received(sandbox_client, vendor: str, email: str, status: int | None = None) -> list[dict]:
    return [r for r in sandbox_client.requests(vendor=vendor)
            if email in json.dumps(r["body"]) and (status is None or r["status"] == status)]


def settled(redis_url: str) -> None:
    """Nothing pending in any person's order, no retry waiting, nothing queued or held."""
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: sum(PersonLog(client, "vdw", v).pending() + client.zcard(f"vdw:retries:{v}")
                               for v in VENDORS) == 0, timeout=60, message="every call settled")
    finally:
        client.close()
    wait_idle(redis_url, timeout=60)


def dead_letters(event_id: str) -> list:
    return [d for d in DeadLetterStore.default().list() if d.event_id == event_id]


def test_messages_queued_before_the_upgrade_deliver_next_to_compact_ones(start_worker, product_env, sandbox_client,
                                                                          unique_email):
    before, compact = f"before-{unique_email}", f"compact-{unique_email}"
    properties = {"plan": "pro", "amount": 49}
    when = "2026-03-04T05:06:07Z"  # ConvertLoop's ocurred_at, else the call's time
    old = prepare_track("signed_up", email=before, properties=properties, occurred_at=when, vendors=VENDORS).payload
    queue_legacy(product_env["REDIS_URL"], old, VENDORS)  # queued at the upgrade, before the new worker starts
    start_worker("formats")
    new_id = worker.track("signed_up", email=compact, properties=properties, occurred_at=when, vendors=VENDORS)

    for email in (before, compact):
        wait_until(lambda e=email: all(received(sandbox_client, v, e, 200) for v in VENDORS), timeout=60,
                   message=f"{email} delivered to every vendor")
    settled(product_env["REDIS_URL"])
    for vendor in VENDORS:  # the same request for either format, but for the email; once each
        (a,), (b,) = received(sandbox_client, vendor, before), received(sandbox_client, vendor, compact)
        assert json.loads(json.dumps(a["body"]).replace(before, compact)) == b["body"], vendor
    loops = {email: received(sandbox_client, "loops", email)[0]["idempotency_key"] for email in (before, compact)}
    assert loops == {before: old["id"], compact: new_id}
    assert dead_letters(old["id"]) == [] and dead_letters(new_id) == []


def test_retries_waiting_in_the_format_before_are_delivered_with_their_attempts_counted(
        start_worker, product_env, sandbox_client, unique_email):
    """A waiting retry written before: delivered when due; its retry header (a mapping then) still counts: one
    with RETRY_MAX_ATTEMPTS - 1 failed attempts that fails once more is dead-lettered after 4 attempts."""
    url = product_env["REDIS_URL"]
    ok_email, last_email = f"ok-{unique_email}", f"last-{unique_email}"
    ok = prepare_track("signed_up", email=ok_email, properties={"plan": "pro"}, vendors=["loops"]).payload
    last = prepare_track("signed_up", email=last_email, properties={"plan": "pro"}, vendors=["convertloop"]).payload
    now = time.time()
    schedule_legacy_retry(url, ok, "loops", attempts=1, first_failure=now)
    schedule_legacy_retry(url, last, "convertloop", attempts=3, first_failure=now)  # RETRY_MAX_ATTEMPTS is 4
    sandbox_client.configure("convertloop", fail_next=[503])
    start_worker("formats-retries")

    wait_until(lambda: received(sandbox_client, "loops", ok_email, 200), timeout=60, message="the retry delivered")
    (entry,) = wait_until(lambda: dead_letters(last["id"]), timeout=60, message="the last attempt dead-lettered")
    assert (entry.vendor, entry.reason, entry.status, entry.attempts) == ("convertloop", "retries_exhausted", 503, 4)
    settled(url)
    assert [r["status"] for r in received(sandbox_client, "loops", ok_email)] == [200]
    assert [r["status"] for r in received(sandbox_client, "convertloop", last_email)] == [503]
    assert dead_letters(ok["id"]) == []


def test_a_message_from_before_that_fails_is_retried_and_its_persons_next_call_waits_for_it(
        start_worker, product_env, sandbox_client, unique_email):
    """Two calls of one person queued before the upgrade: the first fails (its retry is written compact, the
    second parks behind it, written compact too) and both reach the vendor in order."""
    url = product_env["REDIS_URL"]
    first = prepare_track("step_1", email=unique_email, vendors=["loops"]).payload
    second = prepare_track("step_2", email=unique_email, vendors=["loops"]).payload
    queue_legacy(url, first, ["loops"])
    queue_legacy(url, second, ["loops"])
    sandbox_client.configure("loops", fail_next=[{"status": 503, "retry_after": "1"}])
    start_worker("formats-order", WORKER_CONCURRENCY=4)

    wait_until(lambda: len(received(sandbox_client, "loops", unique_email, 200)) == 2, timeout=60,
               message="both calls delivered")
    settled(url)
    got = [(r["body"]["eventName"], r["status"]) for r in received(sandbox_client, "loops", unique_email)]
    assert got == [("step_1", 503), ("step_1", 200), ("step_2", 200)]
    assert [e["eventName"] for e in sandbox_client.state("loops", unique_email)["events"]] == ["step_1", "step_2"]
