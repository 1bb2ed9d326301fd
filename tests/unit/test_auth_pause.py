"""A vendor that refuses the credentials is paused, not dead-lettered event by event: the pipeline against mocked
HTTP (respx), its breaker and dead-letter store on the test Redis."""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.vendormock import vendor_http
from worker import observability
from worker.clients import VendorHTTP
from worker.delivery.deadletters import DeadLetterStore
from worker.delivery.pipeline import Delivered, Pipeline, VendorAuthFailed, VendorDown
from worker.errors import DeadLettered
from worker.limits.ratelimit import Unlimited
from worker.limits.throttle import Throttle
from worker.retries.breaker import AUTH_FAILED, CLOSED, Breaker
from worker.retries.schedule import RetrySchedule
from worker.sandbox import SANDBOX_CREDENTIALS
from worker.settings import Settings
from worker.vendors import VENDORS

BASE = "https://vendor.test"
SECRETS = list(SANDBOX_CREDENTIALS.values())


def settings(**overrides) -> Settings:
    return Settings(
        _env_file=None,
        convertloop_app_id=SANDBOX_CREDENTIALS["CONVERTLOOP_APP_ID"],
        convertloop_api_key=SANDBOX_CREDENTIALS["CONVERTLOOP_API_KEY"],
        convertloop_base_url=f"{BASE}/cl",
        loops_api_key=SANDBOX_CREDENTIALS["LOOPS_API_KEY"],
        loops_base_url=f"{BASE}/loops",
        conveyour_appkey=SANDBOX_CREDENTIALS["CONVEYOUR_APPKEY"],
        conveyour_token=SANDBOX_CREDENTIALS["CONVEYOUR_TOKEN"],
        conveyour_base_url=f"{BASE}/cy",
        conveyour_batch_max_wait=0,
        retry_max_attempts=3, retry_backoff_base=1, retry_backoff_max=8,
        **overrides,
    )


@pytest.fixture
def reports(monkeypatch) -> list[tuple]:
    """Every Sentry report of a pause (observability.report_auth_pause), instead of sending it."""
    calls: list[tuple] = []
    monkeypatch.setattr(observability, "report_auth_pause", lambda *args: calls.append(args))
    return calls


def make_pipeline(client, prefix: str, auth_threshold: int = 3) -> Pipeline:
    s = settings(auth_failure_threshold=auth_threshold, auth_probe_interval=30)
    breaker = Breaker(client, prefix, threshold=10, auth_threshold=s.auth_failure_threshold,
                      auth_interval=s.auth_probe_interval)
    return Pipeline(s, VendorHTTP(), DeadLetterStore(client, prefix, SECRETS),
                    {v: Unlimited() for v in VENDORS}, Throttle(), breaker=breaker,
                    schedule=RetrySchedule(client, prefix))


def track(i: int = 1) -> dict:
    return {"id": f"ev{i}", "operation": "track", "created_at": "2026-01-01T00:00:00Z",
            "identity": {"email": f"p{i}@a.co"}, "event": "sale", "properties": {}, "occurred_at": None}


def identify(i: int = 1) -> dict:
    return {"id": f"id{i}", "operation": "identify", "created_at": "2026-01-01T00:00:00Z",
            "identity": {"email": f"p{i}@a.co"}, "traits": {"plan": "pro"}}


@vendor_http
def test_a_run_of_401s_pauses_the_vendor_and_only_the_first_answers_are_dead_letters(client, prefix, reports, caplog):
    p = make_pipeline(client, prefix)
    route = vendor_http.post(f"{BASE}/loops/events/send").mock(
        return_value=httpx.Response(401, json={"message": "Invalid API key"}))
    for i in (1, 2):  # fewer than AUTH_FAILURE_THRESHOLD in a row: rejected, as any 4xx
        with pytest.raises(DeadLettered):
            p.deliver("loops", track(i))
    with caplog.at_level(logging.ERROR, logger="worker.delivery.pipeline"), pytest.raises(VendorAuthFailed) as paused:
        p.deliver("loops", track(3))  # the third pauses the vendor: this delivery goes back
    assert "LOOPS_API_KEY" in str(paused.value)
    for i in (4, 5):  # in flight when the pause began (sent before this process saw it): back too, not dead
        with pytest.raises(VendorAuthFailed):
            p.deliver("loops", track(i), probe=True)
    with pytest.raises(VendorDown):  # paused: nothing is sent but probes
        p.deliver("loops", track(6))
    assert route.call_count == 5
    entries = p.store.list()
    assert [(e.event_id, e.reason, e.status) for e in entries] == [("ev1", "rejected", 401), ("ev2", "rejected", 401)]
    state = p.breaker.poll("loops")
    assert state.state == AUTH_FAILED and state.auth_failures == 5
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "refuses" in r.getMessage()]
    assert len(errors) == 1 and "fix LOOPS_API_KEY" in errors[0], errors
    assert not any(secret in errors[0] for secret in SECRETS)
    assert reports == [("loops", 401, "LOOPS_API_KEY")]

    route.mock(return_value=httpx.Response(200, json={"success": True}))  # the key works again
    assert isinstance(p.deliver("loops", track(7), probe=True), Delivered)
    assert p.breaker.poll("loops").state == CLOSED and not p.breaker.is_open("loops")
    assert reports == [("loops", 401, "LOOPS_API_KEY")]


@vendor_http
def test_403s_count_too_and_an_accepted_answer_ends_the_run(client, prefix, reports):
    p = make_pipeline(client, prefix)
    route = vendor_http.post(f"{BASE}/cl/event_logs").mock(side_effect=[
        httpx.Response(403), httpx.Response(403), httpx.Response(200),
        httpx.Response(403), httpx.Response(403), httpx.Response(403)])
    for _ in range(2):
        with pytest.raises(DeadLettered):
            p.deliver("convertloop", track())
    assert isinstance(p.deliver("convertloop", track()), Delivered)
    for _ in range(2):  # a new run: two more rejected, no pause yet
        with pytest.raises(DeadLettered):
            p.deliver("convertloop", track())
    assert p.breaker.poll("convertloop").state == CLOSED and reports == []
    with pytest.raises(VendorAuthFailed):  # the third 403 in a row
        p.deliver("convertloop", track())
    assert route.call_count == 6 and p.breaker.poll("convertloop").state == AUTH_FAILED
    assert reports == [("convertloop", 403, VENDORS["convertloop"].credential_env)]


@vendor_http
def test_a_bulk_request_refused_while_paused_sends_every_item_back(client, prefix, reports):
    p = make_pipeline(client, prefix, auth_threshold=1)
    vendor_http.post(f"{BASE}/cy/analytics/identify").respond(401, json={"error": "bad token"})
    with pytest.raises(VendorAuthFailed) as paused:  # through the ConveYour batcher
        p.deliver("conveyour", identify())
    assert "CONVEYOUR_APPKEY" in str(paused.value) and p.store.list() == []
    assert reports == [("conveyour", 401, VENDORS["conveyour"].credential_env)]


@vendor_http
def test_with_the_threshold_zero_every_401_is_a_dead_letter_as_before(client, prefix, reports):
    p = make_pipeline(client, prefix, auth_threshold=0)
    vendor_http.post(f"{BASE}/loops/events/send").mock(return_value=httpx.Response(401))
    for i in range(5):
        with pytest.raises(DeadLettered):
            p.deliver("loops", track(i))
    assert len(p.store.list()) == 5 and p.breaker.poll("loops").state == CLOSED and reports == []


def test_the_settings_and_their_defaults():
    s = Settings(_env_file=None)
    assert (s.auth_failure_threshold, s.auth_probe_interval) == (3, 30.0)
    with pytest.raises(ValueError):
        Settings(_env_file=None, auth_probe_interval=0)
