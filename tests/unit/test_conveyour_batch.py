"""ConveYour bulk identify: the vendor's mapping (pure) and the pipeline sending through the batcher (respx)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pydantic
import pytest
import redis

from tests.vendormock import vendor_http
from worker.clients import VendorHTTP
from worker.delivery.deadletters import DeadLetterStore
from worker.delivery.pipeline import Delivered, Pipeline, RetryLater
from worker.errors import DeadLettered
from worker.events import IdentifyEvent, Identity, SegmentEvent, TrackEvent
from worker.limits.ratelimit import RateLimiter, Reservation, Unlimited
from worker.limits.throttle import Throttle
from worker.sandbox import SANDBOX_CREDENTIALS
from worker.sandbox.conveyour import ConveYourAPI
from worker.settings import (
    DEFAULT_CONVEYOUR_BATCH_MAX_WAIT,
    DEFAULT_CONVEYOUR_BATCH_SIZE,
    Settings,
)
from worker.vendors import VENDORS, Outcome, Verdict

CY = VENDORS["conveyour"]
BASE = "https://acme.conveyour.test/api"
CREATED = "2026-01-01T00:00:00Z"
SECRETS = list(SANDBOX_CREDENTIALS.values())


def settings(**overrides) -> Settings:
    values = dict(_env_file=None, conveyour_appkey=SANDBOX_CREDENTIALS["CONVEYOUR_APPKEY"],
                  conveyour_token=SANDBOX_CREDENTIALS["CONVEYOUR_TOKEN"], conveyour_base_url=BASE,
                  convertloop_app_id=None, convertloop_api_key=None, loops_api_key=None,
                  retry_max_attempts=3, retry_backoff_base=1, retry_backoff_max=8)
    return Settings(**{**values, **overrides})


def identify(uid: str, **traits) -> IdentifyEvent:
    return IdentifyEvent(id=f"ev-{uid}", created_at=CREATED, identity=Identity(user_id=uid), traits=traits)


def segment(uid: str) -> SegmentEvent:
    return SegmentEvent(id=f"seg-{uid}", created_at=CREATED, identity=Identity(user_id=uid), add=["vip"])


def track(uid: str) -> TrackEvent:
    return TrackEvent(id=f"tr-{uid}", created_at=CREATED, identity=Identity(user_id=uid), event="x")


# -- settings -------------------------------------------------------------------

def test_batch_settings_defaults_and_environment(monkeypatch):
    s = Settings(_env_file=None)
    assert (s.conveyour_batch_size, s.conveyour_batch_max_wait) == \
        (DEFAULT_CONVEYOUR_BATCH_SIZE, DEFAULT_CONVEYOUR_BATCH_MAX_WAIT)
    assert (DEFAULT_CONVEYOUR_BATCH_SIZE, DEFAULT_CONVEYOUR_BATCH_MAX_WAIT) == (50, 0.05)
    monkeypatch.setenv("CONVEYOUR_BATCH_SIZE", "7")
    monkeypatch.setenv("CONVEYOUR_BATCH_MAX_WAIT", "0")
    s = Settings(_env_file=None)
    assert (CY.batch_size(s), CY.batch_max_wait(s)) == (7, 0.0)


@pytest.mark.parametrize(("key", "value"), [("conveyour_batch_size", 0), ("conveyour_batch_max_wait", -0.1)])
def test_batch_settings_are_bounded(key, value):
    with pytest.raises(pydantic.ValidationError):
        Settings(_env_file=None, **{key: value})


# -- the vendor's mapping -----------------------------------------------------------

def test_identify_and_segment_are_batchable_track_is_not_and_other_vendors_never_batch():
    s = settings()
    assert CY.batchable(identify("1")) and CY.batchable(segment("1")) and not CY.batchable(track("1"))
    for name in ("loops", "convertloop"):
        assert not VENDORS[name].batchable(identify("1")) and VENDORS[name].batch_size(s) == 1


def test_a_batch_of_one_is_the_plain_request():
    s = settings()
    assert CY.build_batch([identify("1", plan="pro")], s) == CY.build(identify("1", plan="pro"), s)
    assert CY.build_batch([segment("1")], s).json == {"id": "1", "traits": {"tags": {"add": ["vip"], "remove": []}}}


def test_a_bulk_request_is_an_array_of_the_single_objects():
    s = settings()
    events = [identify("1", plan="pro"), segment("2"), identify("3")]
    request = CY.build_batch(events, s)
    assert (request.method, request.path) == ("POST", "/analytics/identify")
    assert request.json == [CY.build(e, s).json for e in events]
    assert request.json[1] == {"id": "2", "traits": {"tags": {"add": ["vip"], "remove": []}}}
    assert not any(secret in json.dumps(request.json) + json.dumps(dict(request.headers)) for secret in SECRETS)
    with pytest.raises(ValueError):
        CY.build_batch([identify("1"), track("2")], s)


def classify(status, body="", n=3, headers=None):
    return [(o.verdict, o.status, o.message) for o in CY.classify_batch(status, headers or {}, body, None, n)]


def test_bulk_2xx_delivers_every_item_and_429_5xx_retry_every_item():
    assert classify(200, '{"success": true, "count": 3}') == [(Verdict.DELIVERED, 200, None)] * 3
    assert classify(503) == [(Verdict.RETRY, 503, None)] * 3
    outcomes = CY.classify_batch(429, {"retry-after": "4"}, "", None, 2)
    assert [(o.verdict, o.retry_after) for o in outcomes] == [(Verdict.RETRY, 4.0)] * 2


def test_bulk_422_with_per_index_errors_rejects_those_and_resends_the_rest():
    body = json.dumps({"success": False, "message": "2 of 3 items are invalid",
                       "errors": [{"index": 0, "message": "id is required"}, {"index": 2, "message": "bad tags"}]})
    assert classify(422, body) == [(Verdict.REJECTED, 422, "id is required"), (Verdict.RESEND, 422, None),
                                   (Verdict.REJECTED, 422, "bad tags")]


@pytest.mark.parametrize("body", [
    "", "not json", '{"message": "bad"}', '{"errors": []}', '{"errors": "x"}',
    '{"errors": [{"index": 3}]}', '{"errors": [{"index": "0"}]}', '{"errors": [{"index": true}]}',
    '{"errors": [{"index": 0}, {"message": "which?"}]}', "[1, 2]",
])
def test_a_rejection_without_usable_per_index_errors_resends_every_item(body):
    assert classify(422, body) == [(Verdict.RESEND, 422, None)] * 3
    assert classify(400, body) == [(Verdict.RESEND, 400, None)] * 3


def test_a_rejection_of_the_request_itself_rejects_every_item():
    assert classify(401, '{"message": "Invalid or missing credentials"}') == [(Verdict.REJECTED, 401, None)] * 3
    assert classify(404) == [(Verdict.REJECTED, 404, None)] * 3


def test_a_single_item_rejection_is_final():
    assert classify(422, '{"errors": []}', n=1) == [(Verdict.REJECTED, 422, None)]


def test_the_mapping_agrees_with_the_sandbox():
    """What the sandbox (following the vendor's document) answers maps back to the right items."""
    s = settings()
    events = [identify("1"), identify("2", tags="oops"), segment("3"), identify("4", tags={"add": [1]})]
    status, body = ConveYourAPI().identify(CY.build_batch(events, s).json)
    verdicts = [o.verdict for o in CY.classify_batch(status, {}, json.dumps(body), None, len(events))]
    assert verdicts == [Verdict.RESEND, Verdict.REJECTED, Verdict.RESEND, Verdict.REJECTED]


# -- the pipeline, through the batcher --------------------------------------------
# A test that needs its items in one bulk request sets the batch size to their number and a max wait far longer
# than the test: the batch goes when the last item joins, however slowly a loaded machine starts the threads.

#: Longer than any test: a batch here is triggered by its size, never by its max wait.
NEVER = 600.0


@pytest.fixture
def store(redis_server, request):
    s = DeadLetterStore(redis.Redis.from_url(redis_server.url), f"unit-{request.node.name}", SECRETS)
    yield s
    s.purge()


def make_pipeline(store, http, limiter: RateLimiter | None = None, **overrides) -> Pipeline:
    limiters = {v: Unlimited() for v in VENDORS} | ({"conveyour": limiter} if limiter else {})
    return Pipeline(settings(**overrides), http, store, limiters, Throttle())


def sandbox_route():
    """A respx ConveYour that validates like the sandbox and records every body."""
    api, bodies, lock = ConveYourAPI(SANDBOX_CREDENTIALS), [], threading.Lock()

    def answer(request: httpx.Request) -> httpx.Response:
        with lock:
            bodies.append(json.loads(request.content))
        status, body = api.handle("POST", "/analytics/identify", request.headers, request.content)
        return httpx.Response(status, json=body)

    vendor_http.post(f"{BASE}/analytics/identify").mock(side_effect=answer)
    return bodies


def payload(event) -> dict:
    return event.model_dump(mode="json")


def deliver_all(pipeline: Pipeline, events) -> list:
    def one(event):
        try:
            return pipeline.deliver("conveyour", payload(event), attempt=1, task_id=f"{event.id}.conveyour")
        except DeadLettered as exc:
            return exc

    with ThreadPoolExecutor(len(events)) as pool:
        return list(pool.map(one, events))


@vendor_http
def test_concurrent_identifies_go_in_one_request_and_only_invalid_ones_are_dead_lettered(store):
    bodies = sandbox_route()
    events = [identify(f"u{i}", plan="pro") for i in range(10)]
    events[3] = identify("u3", tags="not-an-object")
    events[7] = identify("u7", tags={"add": "vip"})
    with VendorHTTP() as http:
        results = deliver_all(make_pipeline(store, http, conveyour_batch_size=10, conveyour_batch_max_wait=NEVER),
                              events)
    assert isinstance(bodies[0], list) and len(bodies[0]) == 10, "one bulk request for all ten"
    assert len(bodies) == 2
    assert sorted(b["id"] for b in bodies[1]) == sorted(f"u{i}" for i in range(10) if i not in (3, 7))
    delivered = [e.id for e, r in zip(events, results, strict=True) if isinstance(r, Delivered)]
    assert delivered == [e.id for i, e in enumerate(events) if i not in (3, 7)]
    entries = {d.event_id: d for d in store.list()}
    assert set(entries) == {"ev-u3", "ev-u7"}
    bad = entries["ev-u3"]
    assert (bad.vendor, bad.operation, bad.reason, bad.status, bad.attempts) == \
        ("conveyour", "identify", "rejected", 422, 1)
    assert "traits.tags must be an object" in bad.error and "bulk request of 10" in bad.error
    assert "traits.tags.add must be a list of strings" in entries["ev-u7"].error
    assert bad.request == {"method": "POST", "path": "/analytics/identify",
                           "json": {"id": "u3", "traits": {"tags": "not-an-object"}}, "headers": {}}
    assert bad.task_id == "ev-u3.conveyour"
    raw = store.client.hget(store.hash_key, bad.id).decode()
    assert not any(secret in raw for secret in SECRETS)


@vendor_http
def test_batch_size_1_sends_each_identify_alone_as_before(store):
    bodies = sandbox_route()
    events = [identify(f"u{i}") for i in range(4)]
    with VendorHTTP() as http:
        results = deliver_all(make_pipeline(store, http, conveyour_batch_size=1), events)
    assert all(isinstance(r, Delivered) for r in results)
    assert sorted(b["id"] for b in bodies) == ["u0", "u1", "u2", "u3"] and all(isinstance(b, dict) for b in bodies)


@vendor_http
def test_track_is_never_batched(store):
    route = vendor_http.post(f"{BASE}/analytics/track").mock(return_value=httpx.Response(200, json={"success": True}))
    with VendorHTTP() as http:
        results = deliver_all(make_pipeline(store, http, conveyour_batch_max_wait=0.3),
                              [track(f"u{i}") for i in range(3)])
    assert all(isinstance(r, Delivered) for r in results)
    assert [json.loads(c.request.content)["id"] for c in route.calls] and all(
        isinstance(json.loads(c.request.content), dict) for c in route.calls)
    assert route.call_count == 3


@vendor_http
@pytest.mark.parametrize("answer", [httpx.Response(503, text="busy"), httpx.ConnectError("refused")])
def test_a_failed_bulk_request_retries_every_item(store, answer):
    route = vendor_http.post(f"{BASE}/analytics/identify")
    route.mock(side_effect=[answer]) if isinstance(answer, Exception) else route.mock(return_value=answer)
    with VendorHTTP() as http:
        results = deliver_all(make_pipeline(store, http, conveyour_batch_size=5, conveyour_batch_max_wait=NEVER),
                              [identify(f"u{i}") for i in range(5)])
    assert route.call_count == 1
    assert all(isinstance(r, RetryLater) and r.attempt == 1 for r in results)
    assert store.list() == []


@vendor_http
def test_a_bulk_429_penalizes_the_bucket_once_and_every_item_honours_retry_after(store):
    class Penalties(RateLimiter):
        def __init__(self):
            self.penalties = []

        def acquire(self, max_wait=0.0):
            return Reservation(True, 0.0)

        def penalize(self, seconds):
            self.penalties.append(seconds)

    limiter = Penalties()
    vendor_http.post(f"{BASE}/analytics/identify").mock(return_value=httpx.Response(429, headers={"Retry-After": "5"}))
    with VendorHTTP() as http:
        results = deliver_all(make_pipeline(store, http, limiter, conveyour_batch_size=4,
                                            conveyour_batch_max_wait=NEVER),
                              [identify(f"u{i}") for i in range(4)])
    assert limiter.penalties == [5.0]
    assert all(isinstance(r, RetryLater) and 5 <= r.countdown <= 5.5 for r in results)


def test_outcome_keeps_its_old_shape():
    assert Outcome(Verdict.RETRY, 503, 1.0) == Outcome(Verdict.RETRY, 503, 1.0, None)
