"""End to end: producer API -> real Redis -> real Celery worker -> sandbox over HTTP."""

from __future__ import annotations

import pytest

import worker
from tests.helpers import wait_idle
from worker.delivery.deadletters import DeadLetterStore
from worker.dev.localstack import wait_until
from worker.producer.api import publish

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def running_worker(worker_factory):
    """``celery -A worker worker`` with no -Q: it must consume every vendor queue."""
    return worker_factory("all")


@pytest.fixture
def env(product_env, running_worker, sandbox_client):
    return product_env


def received(sandbox_client, vendor, match, status=None):
    return [r for r in sandbox_client.requests(vendor=vendor) if match(r) and (status is None or r["status"] == status)]


def body_has(email):
    def match(r):
        return email in str(r["body"])
    return match


def dead_letters(event_id):
    store = DeadLetterStore.default()
    return [d for d in store.list() if d.event_id == event_id]


def test_identify_reaches_every_vendor_with_exact_shapes(env, sandbox_client, unique_email):
    worker.identify(email=unique_email, user_id="u-1", traits={"first_name": "Jill", "career_sales": 500000})
    match = body_has(unique_email)
    wait_until(lambda: all(received(sandbox_client, v, match, 200) for v in ("convertloop", "loops")),
               message="identify")
    wait_until(lambda: received(sandbox_client, "conveyour", lambda r: r["body"].get("id") == "u-1", 200))
    (cl,) = received(sandbox_client, "convertloop", match)
    assert (cl["method"], cl["path"]) == ("POST", "/people")
    assert cl["body"] == {"email": unique_email, "user_id": "u-1", "first_name": "Jill", "career_sales": 500000}
    (lo,) = received(sandbox_client, "loops", match)
    assert (lo["method"], lo["path"]) == ("PUT", "/contacts/update")
    assert lo["body"] == {"email": unique_email, "userId": "u-1", "first_name": "Jill", "career_sales": 500000}
    cy = received(sandbox_client, "conveyour", lambda r: r["body"].get("id") == "u-1")[-1]
    assert (cy["method"], cy["path"]) == ("POST", "/analytics/identify")
    assert cy["body"] == {"id": "u-1", "traits": {"first_name": "Jill", "career_sales": 500000}}
    assert all(r["auth_ok"] for r in (cl, lo, cy))


def test_track_reaches_every_vendor_with_exact_shapes(env, sandbox_client, unique_email):
    event_id = worker.track("made_sale", email=unique_email, properties={"amount": 1000, "customer": "John Doe"},
                            occurred_at="2026-03-04T05:06:07+02:00")
    match = body_has(unique_email)
    wait_until(lambda: all(received(sandbox_client, v, match, 200) for v in ("convertloop", "loops", "conveyour")))
    (cl,) = received(sandbox_client, "convertloop", match)
    assert (cl["method"], cl["path"]) == ("POST", "/event_logs")
    assert cl["body"] == {"name": "made_sale", "person": {"email": unique_email},
                          "metadata": {"amount": 1000, "customer": "John Doe"}, "ocurred_at": "2026-03-04T03:06:07Z"}
    (lo,) = received(sandbox_client, "loops", match)
    assert (lo["method"], lo["path"]) == ("POST", "/events/send")
    assert lo["body"] == {"email": unique_email, "eventName": "made_sale",
                          "eventProperties": {"amount": 1000, "customer": "John Doe"}}
    assert lo["idempotency_key"] == event_id
    (cy,) = received(sandbox_client, "conveyour", match)
    assert (cy["method"], cy["path"]) == ("POST", "/analytics/track")
    assert cy["body"] == {"id": unique_email,
                          "events": [{"event": "made_sale", "properties": {"amount": 1000, "customer": "John Doe"}}]}


def test_segment_reaches_every_vendor_with_exact_shapes(env, sandbox_client, unique_email):
    worker.segment(email=unique_email, add=["vip"], remove=["trial"])
    match = body_has(unique_email)
    wait_until(lambda: all(received(sandbox_client, v, match, 200) for v in ("convertloop", "loops", "conveyour")))
    (cl,) = received(sandbox_client, "convertloop", match)
    assert cl["body"] == {"email": unique_email, "add_to_segments": ["vip"], "remove_from_segments": ["trial"]}
    (lo,) = received(sandbox_client, "loops", match)
    assert lo["body"] == {"email": unique_email, "mailingLists": {"list_vip": True, "list_trial": False}}
    (cy,) = received(sandbox_client, "conveyour", match)
    assert cy["body"] == {"id": unique_email, "traits": {"tags": {"add": ["vip"], "remove": ["trial"]}}}


def test_pid_only_goes_to_convertloop_alone(env, sandbox_client, unique_email):
    pid = "pid-" + unique_email
    worker.track("visited", pid=pid)
    wait_until(lambda: received(sandbox_client, "convertloop", body_has(pid), 200))
    # Positive signal instead of a sleep: an event published after it to Loops and ConveYour arrived, and then
    # the workers hold nothing. A message for the pid event would have been queued ahead of it.
    marker = "after-" + unique_email
    worker.track("visited", email=marker, vendors=["loops", "conveyour"])
    wait_until(lambda: all(received(sandbox_client, v, body_has(marker), 200) for v in ("loops", "conveyour")),
               message="the later event at Loops and ConveYour")
    wait_idle(env["REDIS_URL"])
    assert received(sandbox_client, "loops", body_has(pid)) == []
    assert received(sandbox_client, "conveyour", body_has(pid)) == []
    with pytest.raises(worker.InvalidEvent, match="loops"):
        worker.track("visited", pid=pid, vendors=["loops"])


def test_property_cap_is_checked_again_by_the_worker(env, sandbox_client, unique_email):
    with pytest.raises(worker.InvalidEvent, match="EVENT_PROPERTY_CAP"):
        worker.track("big", email=unique_email, properties={f"p{i}": i for i in range(16)})
    # A message that slipped past the producer (older producer, other tool): the worker refuses to send it.
    payload = {"id": "cap-" + unique_email, "operation": "track", "created_at": "2026-01-01T00:00:00Z",
               "identity": {"email": unique_email}, "event": "big", "properties": {f"p{i}": i for i in range(16)},
               "occurred_at": None}
    publish(payload, ["conveyour", "loops"])
    entries = wait_until(lambda: len(dead_letters(payload["id"])) == 2 and dead_letters(payload["id"]),
                         message="cap dead letters")
    assert {(d.vendor, d.reason, d.attempts) for d in entries} == {("conveyour", "property_cap", 1),
                                                                   ("loops", "property_cap", 1)}
    assert received(sandbox_client, "conveyour", body_has(unique_email)) == []
    assert received(sandbox_client, "loops", body_has(unique_email)) == []


def test_5xx_then_success_is_retried(env, sandbox_client, unique_email):
    sandbox_client.configure("loops", fail_next=[503, 500])
    worker.track("made_sale", email=unique_email, vendors=["loops"])
    wait_until(lambda: received(sandbox_client, "loops", body_has(unique_email), 200), timeout=20)
    statuses = [r["status"] for r in received(sandbox_client, "loops", body_has(unique_email))]
    assert statuses == [503, 500, 200]


def test_429_retry_after_is_honoured(env, sandbox_client, unique_email):
    sandbox_client.configure("convertloop", fail_next=[{"status": 429, "retry_after": "2"}])
    worker.identify(email=unique_email, vendors=["convertloop"])
    wait_until(lambda: received(sandbox_client, "convertloop", body_has(unique_email), 200), timeout=20)
    first, second = received(sandbox_client, "convertloop", body_has(unique_email))
    assert first["status"] == 429 and second["status"] == 200
    assert second["ts"] - first["ts"] >= 2.0


def test_429_retry_after_http_date_is_honoured(env, sandbox_client, unique_email):
    sandbox_client.configure("loops", rate_limit=0.5, retry_after=2, retry_after_format="http-date")
    for i in range(2):
        worker.identify(email=f"{i}{unique_email}", vendors=["loops"])
    wait_until(lambda: len(received(sandbox_client, "loops", body_has(unique_email), 200)) == 2, timeout=25)
    rejected = received(sandbox_client, "loops", body_has(unique_email), 429)
    assert rejected, "the sandbox's limit should have answered 429 once"
    ok = received(sandbox_client, "loops", body_has(unique_email), 200)
    assert ok[-1]["ts"] - rejected[0]["ts"] >= 1.0  # an HTTP date has 1 s resolution


def test_422_is_dead_lettered_after_one_attempt(env, sandbox_client, unique_email):
    sandbox_client.configure("conveyour", fail_next=[{"status": 422, "body": {"error": "bad field"}}])
    event_id = worker.identify(email=unique_email, vendors=["conveyour"])
    (entry,) = wait_until(lambda: dead_letters(event_id), message="dead letter")
    assert (entry.vendor, entry.operation, entry.reason, entry.status, entry.attempts) == \
        ("conveyour", "identify", "rejected", 422, 1)
    assert "bad field" in entry.response_body
    wait_idle(env["REDIS_URL"])  # nothing queued or held: no further request can come
    assert len(received(sandbox_client, "conveyour", body_has(unique_email))) == 1


def test_retries_exhausted_are_dead_lettered(env, sandbox_client, unique_email):
    sandbox_client.configure("convertloop", fail_next=[500, 500, 500, 500])
    event_id = worker.track("x", email=unique_email, vendors=["convertloop"])
    (entry,) = wait_until(lambda: dead_letters(event_id), timeout=30, message="dead letter")
    assert (entry.reason, entry.status, entry.attempts) == ("retries_exhausted", 500, 4)
    assert len(received(sandbox_client, "convertloop", body_has(unique_email))) == 4


def test_replay_sends_to_that_vendor_only(env, sandbox_client, unique_email):
    from worker.ops.cli import main

    sandbox_client.configure("loops", fail_next=[422])
    event_id = worker.track("made_sale", email=unique_email)
    (entry,) = wait_until(lambda: dead_letters(event_id), message="dead letter")
    wait_until(lambda: len(received(sandbox_client, "convertloop", body_has(unique_email), 200)) == 1)
    assert main(["deadletters", "replay", entry.id]) == 0
    wait_until(lambda: received(sandbox_client, "loops", body_has(unique_email), 200), message="replayed delivery")
    wait_idle(env["REDIS_URL"])  # nothing queued or held: no further request can come
    assert len(received(sandbox_client, "convertloop", body_has(unique_email))) == 1
    assert len(received(sandbox_client, "conveyour", body_has(unique_email))) == 1
    assert dead_letters(event_id) == []


def test_loops_idempotency_conflict_counts_as_delivered(env, sandbox_client, unique_email):
    payload_id = worker.track("signup", email=unique_email, vendors=["loops"])
    wait_until(lambda: received(sandbox_client, "loops", body_has(unique_email), 200))
    # The same event again (e.g. a redelivery after a crash): Loops answers 409, which is success.
    from worker.producer.api import publish as republish
    entry = received(sandbox_client, "loops", body_has(unique_email), 200)[0]
    payload = {"id": payload_id, "operation": "track", "created_at": "2026-01-01T00:00:00Z",
               "identity": {"email": unique_email}, "event": "signup", "properties": {}, "occurred_at": None}
    republish(payload, ["loops"], task_id_suffix=".again")
    wait_until(lambda: received(sandbox_client, "loops", body_has(unique_email), 409))
    wait_idle(env["REDIS_URL"])  # nothing queued or held: no further request can come
    assert entry["idempotency_key"] == payload_id
    assert dead_letters(payload_id) == []
