"""The delivery pipeline against mocked HTTP (respx) and the test Redis."""

from __future__ import annotations

import json

import httpx
import pytest
import redis

from tests.vendormock import vendor_http
from worker import clients
from worker.clients import VendorHTTP
from worker.delivery.deadletters import DeadLetterStore
from worker.delivery.pipeline import Delivered, Pipeline, RetryLater
from worker.errors import DeadLettered
from worker.limits.ratelimit import Unlimited
from worker.limits.throttle import Throttle
from worker.sandbox import SANDBOX_CREDENTIALS
from worker.settings import Settings
from worker.vendors import VENDORS

BASE = "https://vendor.test"
SECRETS = list(SANDBOX_CREDENTIALS.values())


@pytest.fixture
def store(redis_server, request):
    client = redis.Redis.from_url(redis_server.url)
    s = DeadLetterStore(client, f"unit-{request.node.name}", SECRETS)
    yield s
    s.purge()


@pytest.fixture
def pipeline(store):
    settings = Settings(
        _env_file=None,
        convertloop_app_id=SANDBOX_CREDENTIALS["CONVERTLOOP_APP_ID"],
        convertloop_api_key=SANDBOX_CREDENTIALS["CONVERTLOOP_API_KEY"],
        convertloop_base_url=f"{BASE}/cl",
        loops_api_key=SANDBOX_CREDENTIALS["LOOPS_API_KEY"],
        loops_base_url=f"{BASE}/loops",
        conveyour_appkey=None, conveyour_token=None,
        retry_max_attempts=3, retry_backoff_base=1, retry_backoff_max=8,
    )
    with VendorHTTP() as http:
        yield Pipeline(settings, http, store, {v: Unlimited() for v in VENDORS}, Throttle())


def track(n_props: int = 1, email: str = "j@a.co") -> dict:
    return {"id": "ev1", "operation": "track", "created_at": "2026-01-01T00:00:00Z", "identity": {"email": email},
            "event": "sale", "properties": {f"p{i}": i for i in range(n_props)}, "occurred_at": None}


@vendor_http
def test_2xx_is_delivered_with_credentials_only_in_headers(pipeline):
    route = vendor_http.post(f"{BASE}/loops/events/send").mock(return_value=httpx.Response(200, json={"success": True}))
    result = pipeline.deliver("loops", track(), attempt=1)
    assert isinstance(result, Delivered) and result.status == 200
    sent = route.calls.last.request
    assert sent.headers["authorization"] == f"Bearer {SANDBOX_CREDENTIALS['LOOPS_API_KEY']}"
    assert sent.headers["idempotency-key"] == "ev1"
    assert json.loads(sent.content)["eventName"] == "sale"


@vendor_http
def test_5xx_retries_with_backoff_then_dead_letters_when_exhausted(pipeline, store):
    vendor_http.post(f"{BASE}/cl/event_logs").mock(return_value=httpx.Response(503, text="busy"))
    first = pipeline.deliver("convertloop", track(), attempt=1)
    assert isinstance(first, RetryLater) and first.status == 503 and 0 <= first.countdown <= 1
    second = pipeline.deliver("convertloop", track(), attempt=2)
    assert 0 <= second.countdown <= 2
    with pytest.raises(DeadLettered) as info:
        pipeline.deliver("convertloop", track(), attempt=3)
    (entry,) = store.list()
    assert (entry.reason, entry.status, entry.attempts, entry.vendor) == ("retries_exhausted", 503, 3, "convertloop")
    assert info.value.entry_id == entry.id and "status=503" in str(info.value)


@vendor_http
def test_429_retry_after_sets_the_countdown(pipeline):
    vendor_http.post(f"{BASE}/loops/events/send").mock(return_value=httpx.Response(429, headers={"Retry-After": "5"}))
    result = pipeline.deliver("loops", track(), attempt=1)
    assert isinstance(result, RetryLater) and 5 <= result.countdown <= 5.5


@vendor_http
def test_network_errors_are_retried(pipeline):
    vendor_http.post(f"{BASE}/loops/events/send").mock(side_effect=httpx.ConnectError("refused"))
    result = pipeline.deliver("loops", track(), attempt=1)
    assert isinstance(result, RetryLater) and result.status is None and "ConnectError" in result.error


@vendor_http
def test_422_is_dead_lettered_with_body_and_without_secrets(pipeline, store):
    echo = f"bad key {SANDBOX_CREDENTIALS['LOOPS_API_KEY']}"
    vendor_http.post(f"{BASE}/loops/events/send").mock(return_value=httpx.Response(422, text=echo))
    with pytest.raises(DeadLettered):
        pipeline.deliver("loops", track(), attempt=1)
    (entry,) = store.list()
    assert (entry.reason, entry.status, entry.attempts, entry.operation) == ("rejected", 422, 1, "track")
    assert entry.response_body == "bad key [Filtered]"
    raw = store.client.hget(store.hash_key, entry.id).decode()
    assert not any(s in raw for s in SECRETS)
    assert entry.request["path"] == "/events/send" and "authorization" not in json.dumps(entry.request).lower()


@vendor_http
def test_property_cap_dead_letters_without_sending(pipeline, store):
    route = vendor_http.post(f"{BASE}/loops/events/send")
    with pytest.raises(DeadLettered):
        pipeline.deliver("loops", track(n_props=16), attempt=1)
    assert not route.called
    assert store.list()[0].reason == "property_cap"


@pytest.mark.parametrize(
    ("vendor", "payload"),
    [("mailchimp", track()), (None, track()), ("loops", "not json"), ("loops", {"operation": "track"}),
     ("loops", {**track(), "operation": "delete"}), ("loops", {**track(), "identity": {}}), ("loops", [1, 2])],
)
def test_malformed_messages_are_dead_lettered(pipeline, store, vendor, payload):
    with pytest.raises(DeadLettered):
        pipeline.deliver(vendor, payload, attempt=1)
    (entry,) = store.list()
    assert entry.reason == "malformed" and not entry.replayable and entry.raw


def test_disabled_vendor_is_dead_lettered_for_later_replay(pipeline, store):
    with pytest.raises(DeadLettered):
        pipeline.deliver("conveyour", track(), attempt=1)
    (entry,) = store.list()
    assert entry.reason == "vendor_disabled" and "CONVEYOUR_APPKEY" in entry.error and entry.replayable


@vendor_http
def test_the_retry_window_ends_in_retries_exhausted_with_first_and_last_failure(pipeline, store, monkeypatch):
    import time

    from worker.delivery import pipeline as pipeline_module
    from worker.events import utc_iso
    from worker.retries.attempts import RetryState

    class Clock:
        """The pipeline's clock, standing still at ``now``: the window's edges are exact, however slow the test."""

        def __init__(self, now: float, monotonic) -> None:
            self.now, self.monotonic = now, monotonic

        def time(self) -> float:
            return self.now

    clock = Clock(time.time(), time.monotonic)
    monkeypatch.setattr(pipeline_module, "time", clock)
    pipeline.settings = pipeline.settings.model_copy(update={"retry_max_attempts": 0, "retry_window": 3600})
    vendor_http.post(f"{BASE}/cl/event_logs").mock(return_value=httpx.Response(500))
    first = pipeline.deliver("convertloop", track(), attempt=1)
    assert isinstance(first, RetryLater) and first.state.attempts == 1
    assert first.state.first_failure == clock.now  # the window starts at the first failure
    # Inside the window, half a second before its end: retried, the wait (up to 8 s) cut to what is left.
    late = pipeline.deliver("convertloop", track(), attempt=40, first_failure=clock.now - 3599.5)
    assert isinstance(late, RetryLater) and late.countdown <= 0.5
    assert late.state == RetryState(40, late.state.first_failure)
    # Past it: the dead letter, with attempts and both failure times.
    with pytest.raises(DeadLettered):
        pipeline.deliver("convertloop", track(), attempt=41, first_failure=clock.now - 3601)
    (entry,) = store.list()
    assert (entry.reason, entry.status, entry.attempts) == ("retries_exhausted", 500, 41)
    assert entry.first_failed_at is not None and entry.first_failed_at < entry.failed_at
    assert entry.first_failed_at == utc_iso(clock.now - 3601) and "RETRY_WINDOW" in entry.error


@vendor_http
def test_a_429_never_counts_an_attempt_nor_ends_the_window(pipeline, store):
    import time

    vendor_http.post(f"{BASE}/loops/events/send").mock(return_value=httpx.Response(429, headers={"Retry-After": "2"}))
    # attempt 3 of RETRY_MAX_ATTEMPTS=3 and far past the window: a 5xx would dead-letter, a 429 does not.
    pipeline.settings = pipeline.settings.model_copy(update={"retry_window": 60})
    result = pipeline.deliver("loops", track(), attempt=3, first_failure=time.time() - 3600)
    assert isinstance(result, RetryLater) and result.status == 429 and 2 <= result.countdown <= 2.3
    assert result.state.attempts == 2  # the next attempt is attempt 3 again
    assert store.list() == []


@vendor_http
def test_an_open_breaker_sends_nothing_but_the_probe(pipeline, redis_server):
    import uuid

    from worker.delivery.pipeline import VendorDown
    from worker.retries.breaker import Breaker

    pipeline.breaker = Breaker(redis.Redis.from_url(redis_server.url), f"unit-{uuid.uuid4().hex[:8]}", threshold=2)
    route = vendor_http.post(f"{BASE}/loops/events/send").mock(
        side_effect=[httpx.Response(503), httpx.Response(503), httpx.Response(200, json={"success": True})])
    for attempt in (1, 2):
        assert isinstance(pipeline.deliver("loops", track(), attempt=attempt), RetryLater)
    with pytest.raises(VendorDown):
        pipeline.deliver("loops", track(), attempt=1)
    assert route.call_count == 2
    assert isinstance(pipeline.deliver("loops", track(), attempt=3, probe=True), Delivered)
    assert not pipeline.breaker.is_open("loops") and route.call_count == 3


def test_a_request_whose_slot_passed_before_it_could_leave_takes_another_slot_and_is_sent_once(pipeline):
    """The throttle hands out a token with a deadline; an exchange past it sends nothing (SlotMissed) and the
    delivery waits for another token. After MAX_SLOTS_MISSED missed ones the request goes without a deadline."""
    import time

    from worker.clients import SlotMissed
    from worker.delivery import pipeline as pipeline_module

    class Deadlines(Throttle):
        def __init__(self, missed: int) -> None:
            super().__init__()
            self.missed = missed
            self.tokens = 0

        def wait(self, vendor, limiter):
            self.tokens += 1
            return time.monotonic() - 1 if self.tokens <= self.missed else time.monotonic() + 60

    class Exchange:
        def __init__(self) -> None:
            self.deadlines: list[float | None] = []

        def exchange(self, method, url, headers, json, timeout, send_by=None):
            self.deadlines.append(send_by)
            if send_by is not None and time.monotonic() > send_by:
                raise SlotMissed("not sent")
            return clients.Reply(200, {}, '{"success": true}')

    most = pipeline_module.MAX_SLOTS_MISSED
    for missed, tokens, sent in ((1, 2, 1), (most + 5, most + 1, 1)):
        pipeline.throttle, pipeline.http = Deadlines(missed), Exchange()
        result = pipeline.deliver("loops", track(), attempt=1)
        assert isinstance(result, Delivered) and result.status == 200
        assert pipeline.throttle.tokens == tokens
        assert len(pipeline.http.deadlines) == tokens
        assert sum(d is None or d > time.monotonic() for d in pipeline.http.deadlines) == sent
