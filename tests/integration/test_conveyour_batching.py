"""ConveYour bulk identify end to end: producer -> Redis -> a real Celery worker -> the sandbox.

The worker has ConveYour's limit at 5 requests/s (the sandbox enforces the same),
so one identify per request could deliver 5 identifies a second; batched they
arrive in far fewer requests, and a bulk request the vendor rejects is split so
that only the invalid identifies are dead-lettered.
"""

from __future__ import annotations

import time

import pytest

import worker
from tests.helpers import wait_idle
from worker.delivery.deadletters import DeadLetterStore
from worker.dev.localstack import wait_until

pytestmark = pytest.mark.integration

RATE = 5
#: A worker batch waits this long for more identifies after its first, so a quick burst shares requests.
MAX_WAIT = 0.5


@pytest.fixture(scope="module")
def batching_worker(worker_factory):
    return worker_factory("cy-batch", ("-Q", "conveyour"), CONVEYOUR_RATE_LIMIT=RATE, CONVEYOUR_BATCH_SIZE=50,
                          CONVEYOUR_BATCH_MAX_WAIT=MAX_WAIT)


@pytest.fixture
def env(product_env, batching_worker, sandbox_client):
    sandbox_client.configure("conveyour", rate_limit=RATE)
    return product_env


def items(record) -> list[dict]:
    body = record["body"]
    return body if isinstance(body, list) else [body]


def mine(sandbox_client, tag, status=None) -> list[dict]:
    return [r for r in sandbox_client.requests(vendor="conveyour")
            if r["path"] == "/analytics/identify" and tag in str(r["body"])
            and (status is None or r["status"] == status)]


def delivered_ids(sandbox_client, tag) -> list[str]:
    return [item["id"] for r in mine(sandbox_client, tag, 200) for item in items(r)]


def dead_letters(event_ids) -> list:
    return [d for d in DeadLetterStore.default().list(vendor="conveyour") if d.event_id in event_ids]


def test_identifies_share_requests_under_a_low_rate_limit(env, sandbox_client, unique_email):
    n, tag = 60, unique_email
    emails = [f"{i}-{tag}" for i in range(n)]
    t0 = time.time()
    ids = [worker.identify(email=e, traits={"plan": "pro", "seat": i}, vendors=["conveyour"])
           for i, e in enumerate(emails)]
    wait_until(lambda: set(delivered_ids(sandbox_client, tag)) == set(emails), timeout=30, message=f"{n} identifies")
    took = time.time() - t0
    requests = mine(sandbox_client, tag)
    print(f"\n{n} identifies in {len(requests)} requests (sizes {[len(items(r)) for r in requests]}) "
          f"in {took:.2f}s at {RATE} requests/s (one identify per request would need {n / RATE:.0f}s)")
    assert [r["status"] for r in requests] == [200] * len(requests), "no request was refused (nor over the limit)"
    # Each request took one token: far fewer tokens than identifies is what makes batching faster than one
    # identify per token (the time itself is printed, not asserted).
    assert len(requests) <= n // 4, "far fewer requests than identifies"
    assert sorted(delivered_ids(sandbox_client, tag)) == sorted(emails), "each identify delivered exactly once"
    by_id = {item["id"]: item for r in requests for item in items(r)}
    assert by_id[emails[7]] == {"id": emails[7], "traits": {"plan": "pro", "seat": 7}}
    assert dead_letters(set(ids)) == []


def test_only_the_invalid_identifies_of_a_rejected_batch_are_dead_lettered(env, sandbox_client, unique_email):
    n, tag, bad_at = 30, unique_email, (4, 15, 26)
    emails = [f"{i}-{tag}" for i in range(n)]
    ids = [worker.identify(email=e, traits={"tags": "not-a-tag-object"} if i in bad_at else {"plan": "pro"},
                           vendors=["conveyour"]) for i, e in enumerate(emails)]
    good = {e for i, e in enumerate(emails) if i not in bad_at}
    bad_ids = {ids[i] for i in bad_at}
    wait_until(lambda: set(delivered_ids(sandbox_client, tag)) == good and len(dead_letters(set(ids))) == len(bad_at),
               timeout=30, message="good ones delivered, bad ones dead-lettered")
    wait_idle(env["REDIS_URL"])  # nothing queued or held: no further request or dead letter can come
    entries = dead_letters(set(ids))
    assert {d.event_id for d in entries} == bad_ids
    assert all((d.reason, d.status, d.attempts, d.operation) == ("rejected", 422, 1, "identify") for d in entries)
    assert all("traits.tags must be an object" in d.error for d in entries)
    assert all(d.request["json"]["traits"] == {"tags": "not-a-tag-object"} for d in entries)
    refused = mine(sandbox_client, tag, 422)
    assert any(isinstance(r["body"], list) and len(r["body"]) > 1 for r in refused), "a bulk request was split"
    assert sorted(delivered_ids(sandbox_client, tag)) == sorted(good), "each good identify delivered once"
    assert len(mine(sandbox_client, tag)) < n


def test_a_bulk_rejection_without_per_item_errors_is_split_and_everything_valid_arrives(env, sandbox_client,
                                                                                        unique_email):
    sandbox_client.configure("conveyour", fail_next=[{"status": 422, "body": {"message": "bulk refused"}}])
    n, tag = 20, unique_email
    emails = [f"{i}-{tag}" for i in range(n)]
    ids = [worker.identify(email=e, vendors=["conveyour"]) for e in emails]
    wait_until(lambda: set(delivered_ids(sandbox_client, tag)) == set(emails), timeout=30, message="all delivered")
    requests = mine(sandbox_client, tag)
    first = requests[0]
    print(f"\nrefused bulk of {len(items(first))}, then {[len(items(r)) for r in requests[1:]]}")
    assert first["status"] == 422 and len(items(first)) > 1
    assert dead_letters(set(ids)) == []
    assert sorted(delivered_ids(sandbox_client, tag)) == sorted(emails)
    assert len(requests) < n
