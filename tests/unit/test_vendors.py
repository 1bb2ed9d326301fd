"""Per-vendor request mapping and response classification (pure: no I/O)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from worker.events import IdentifyEvent, Identity, SegmentEvent, TrackEvent
from worker.settings import Settings
from worker.vendors import VENDORS, Request, Verdict, parse_retry_after

SETTINGS = Settings(
    convertloop_app_id="app-1",
    convertloop_api_key="clkey",
    loops_api_key="lkey",
    loops_mailing_lists={"vip": "list_vip", "trial": "list_trial"},
    conveyour_appkey="cyapp",
    conveyour_token="cytok",
    conveyour_base_url="https://acme.conveyour.com/api",
    _env_file=None,
)
CREATED = "2026-01-01T00:00:00Z"


def identify(**identity):
    return IdentifyEvent(id="ev1", created_at=CREATED, identity=Identity(**identity),
                         traits={"plan": "pro", "seats": 3})


def track(**identity):
    return TrackEvent(id="ev2", created_at=CREATED, identity=Identity(**identity), event="made_sale",
                      properties={"amount": 1000, "customer": "John Doe"}, occurred_at="2026-02-03T04:05:06Z")


def segment(**identity):
    return SegmentEvent(id="ev3", created_at=CREATED, identity=Identity(**identity), add=["vip"], remove=["trial"])


def build(vendor, event) -> Request:
    return VENDORS[vendor].build(event, SETTINGS)


class TestConvertLoop:
    def test_identify_posts_people_with_identity_and_traits(self):
        r = build("convertloop", identify(email="j@a.co", user_id="42", pid="p1"))
        assert (r.method, r.path) == ("POST", "/people")
        assert r.json == {"pid": "p1", "user_id": "42", "email": "j@a.co", "plan": "pro", "seats": 3}

    def test_track_posts_event_logs_with_person_metadata_and_ocurred_at(self):
        r = build("convertloop", track(email="j@a.co"))
        assert (r.method, r.path) == ("POST", "/event_logs")
        assert r.json == {
            "name": "made_sale",
            "person": {"email": "j@a.co"},
            "metadata": {"amount": 1000, "customer": "John Doe"},
            "ocurred_at": "2026-02-03T04:05:06Z",
        }

    def test_track_without_time_carries_when_the_call_was_made(self):
        e = TrackEvent(id="e", created_at=CREATED, identity=Identity(pid="p1"), event="x")
        assert build("convertloop", e).json["ocurred_at"] == CREATED

    def test_segment_posts_people_with_segment_lists(self):
        r = build("convertloop", segment(pid="p1"))
        assert (r.method, r.path) == ("POST", "/people")
        assert r.json == {"pid": "p1", "add_to_segments": ["vip"], "remove_from_segments": ["trial"]}

    def test_basic_auth_and_pid_only_is_carried(self):
        v = VENDORS["convertloop"]
        assert v.auth_headers(SETTINGS) == {"Authorization": "Basic " + base64.b64encode(b"app-1:clkey").decode()}
        assert v.refusal(track(pid="p1"), SETTINGS) is None


class TestLoops:
    def test_identify_puts_contacts_update(self):
        r = build("loops", identify(email="j@a.co", user_id="42", pid="p1"))
        assert (r.method, r.path) == ("PUT", "/contacts/update")
        assert r.json == {"email": "j@a.co", "userId": "42", "plan": "pro", "seats": 3}

    def test_track_sends_event_with_idempotency_key(self):
        r = build("loops", track(user_id="42"))
        assert (r.method, r.path) == ("POST", "/events/send")
        assert r.json == {"userId": "42", "eventName": "made_sale",
                          "eventProperties": {"amount": 1000, "customer": "John Doe"}}
        assert r.headers == {"Idempotency-Key": "ev2"}

    def test_segment_maps_mailing_lists(self):
        r = build("loops", segment(email="j@a.co"))
        assert (r.method, r.path) == ("PUT", "/contacts/update")
        assert r.json == {"email": "j@a.co", "mailingLists": {"list_vip": True, "list_trial": False}}

    def test_refuses_pid_only_and_unmapped_segments(self):
        v = VENDORS["loops"]
        assert "pid alone" in v.refusal(track(pid="p1"), SETTINGS)
        e = SegmentEvent(id="e", created_at=CREATED, identity=Identity(email="j@a.co"), add=["unknown"])
        assert "LOOPS_MAILING_LISTS" in v.refusal(e, SETTINGS)
        assert v.refusal(segment(email="j@a.co"), SETTINGS) is None

    def test_409_on_repeated_idempotency_key_is_delivered(self):
        v = VENDORS["loops"]
        with_key = build("loops", track(email="j@a.co"))
        assert v.classify(409, {}, with_key).verdict is Verdict.DELIVERED
        without_key = build("loops", identify(email="j@a.co"))
        assert v.classify(409, {}, without_key).verdict is Verdict.REJECTED

    def test_bearer_auth(self):
        assert VENDORS["loops"].auth_headers(SETTINGS) == {"Authorization": "Bearer lkey"}


class TestConveYour:
    def test_identify_uses_user_id_as_id(self):
        r = build("conveyour", identify(email="j@a.co", user_id="42"))
        assert (r.method, r.path) == ("POST", "/analytics/identify")
        assert r.json == {"id": "42", "traits": {"plan": "pro", "seats": 3}}

    def test_track_falls_back_to_email(self):
        r = build("conveyour", track(email="j@a.co"))
        assert (r.method, r.path) == ("POST", "/analytics/track")
        assert r.json == {"id": "j@a.co",
                          "events": [{"event": "made_sale", "properties": {"amount": 1000, "customer": "John Doe"}}]}

    def test_segment_is_tags(self):
        r = build("conveyour", segment(user_id="42"))
        assert r.json == {"id": "42", "traits": {"tags": {"add": ["vip"], "remove": ["trial"]}}}

    def test_headers_and_refusal(self):
        v = VENDORS["conveyour"]
        assert v.auth_headers(SETTINGS) == {"x-conveyour-appkey": "cyapp", "x-conveyour-token": "cytok"}
        assert v.refusal(identify(pid="p1"), SETTINGS) is not None


@pytest.mark.parametrize("vendor", sorted(VENDORS))
@pytest.mark.parametrize(
    ("status", "verdict"),
    [(200, Verdict.DELIVERED), (201, Verdict.DELIVERED), (204, Verdict.DELIVERED),
     (429, Verdict.RETRY), (500, Verdict.RETRY), (502, Verdict.RETRY), (503, Verdict.RETRY), (408, Verdict.RETRY),
     (400, Verdict.REJECTED), (401, Verdict.REJECTED), (403, Verdict.REJECTED), (404, Verdict.REJECTED),
     (422, Verdict.REJECTED), (410, Verdict.REJECTED), (301, Verdict.REJECTED)],
)
def test_classification(vendor, status, verdict):
    request = Request("POST", "/x", {})
    assert VENDORS[vendor].classify(status, {}, request).verdict is verdict


def test_retry_after_seconds_and_http_date():
    v = VENDORS["loops"]
    assert v.classify(429, {"retry-after": "7"}, Request("POST", "/x", {})).retry_after == 7.0
    when = datetime.now(UTC) + timedelta(seconds=30)
    got = v.classify(503, {"retry-after": format_datetime(when, usegmt=True)}, Request("POST", "/x", {})).retry_after
    assert 28 <= got <= 30
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None


def test_enabled_follows_credentials():
    empty = Settings(_env_file=None, convertloop_app_id=None, convertloop_api_key=None, loops_api_key=None,
                     conveyour_appkey=None, conveyour_token=None)
    assert not any(v.enabled(empty) for v in VENDORS.values())
    assert all(v.enabled(SETTINGS) for v in VENDORS.values())


def test_incomplete_credentials_are_a_clear_error():
    with pytest.raises(ValueError, match="CONVERTLOOP_API_KEY"):
        Settings(convertloop_app_id="a", convertloop_api_key=None)
    with pytest.raises(ValueError, match="CONVEYOUR_BASE_URL"):
        Settings(conveyour_appkey="a", conveyour_token="b", conveyour_base_url=None)
