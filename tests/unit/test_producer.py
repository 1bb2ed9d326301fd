"""Producer validation: bad input raises InvalidEvent saying what is wrong, and enqueues nothing."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import worker
from worker.events import encode, parse_event
from worker.producer import api as producer
from worker.sandbox import SANDBOX_CREDENTIALS
from worker.settings import get_settings


@pytest.fixture
def published(monkeypatch):
    """Every vendor enabled; publish() records instead of talking to Redis."""
    for key, value in SANDBOX_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CONVEYOUR_BASE_URL", "http://127.0.0.1:9/conveyour/api")
    monkeypatch.setenv("LOOPS_MAILING_LISTS", json.dumps({"vip": "l1"}))
    monkeypatch.setenv("EVENT_PROPERTY_CAP", "15")
    get_settings.cache_clear()
    calls: list[tuple[dict, list[str]]] = []
    monkeypatch.setattr(producer, "publish", lambda payload, vendors, **kw: calls.append((payload, vendors)))
    yield calls
    get_settings.cache_clear()


def test_track_fans_out_to_every_vendor_and_round_trips(published):
    when = datetime(2026, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    event_id = worker.track("made_sale", email="jill@acme.co", properties={"amount": 1000, "tags": ["a"]},
                            occurred_at=when)
    ((payload, vendors),) = published
    assert vendors == ["convertloop", "loops", "conveyour"]
    assert payload["id"] == event_id and isinstance(event_id, str)
    assert payload["occurred_at"] == "2026-05-01T10:00:00Z"
    assert encode(parse_event(json.loads(json.dumps(payload)))) == payload  # unset fields left out, read back as None


def test_vendors_selects_and_pid_only_skips(published):
    worker.identify(pid="p1", traits={"a": 1})
    worker.identify(email="j@a.co", vendors=["loops"])
    assert [v for _, v in published] == [["convertloop"], ["loops"]]


def test_segment_without_mailing_list_skips_loops_but_naming_it_fails(published):
    worker.segment(email="j@a.co", add=["unmapped"])
    assert published[0][1] == ["convertloop", "conveyour"]
    with pytest.raises(worker.InvalidEvent, match="LOOPS_MAILING_LISTS"):
        worker.segment(email="j@a.co", add=["unmapped"], vendors=["loops"])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: worker.track("x"), "identity is required"),
        (lambda: worker.track("", email="j@a.co"), "event name"),
        (lambda: worker.track("   ", email="j@a.co"), "event name"),
        (lambda: worker.track(None, email="j@a.co"), "event name"),
        (lambda: worker.track("x", email=5), "email"),
        (lambda: worker.track("x", email="not-an-email"), "email"),
        (lambda: worker.track("x", user_id=""), "user_id"),
        (lambda: worker.track("x", email="j@a.co", properties=[1, 2]), "properties must be a dict"),
        (lambda: worker.track("x", email="j@a.co", properties={"s": {1, 2}}), "JSON"),
        (lambda: worker.track("x", email="j@a.co", properties={"d": datetime.now()}), "JSON"),
        (lambda: worker.track("x", email="j@a.co", properties={"b": b"bytes"}), "JSON"),
        (lambda: worker.track("x", email="j@a.co", properties={"n": float("nan")}), "NaN"),
        (lambda: worker.track("x", email="j@a.co", properties={"i": float("inf")}), "NaN and Infinity"),
        (lambda: worker.track("x", email="j@a.co", properties={"": 1}), "properties"),
        (lambda: worker.track("x", email="j@a.co", properties={f"p{i}": i for i in range(16)}), "at most 15"),
        (lambda: worker.track("x", email="j@a.co", properties={"big": "x" * 40_000}), "bytes as JSON"),
        (lambda: worker.track("x", email="j@a.co" + "x" * 600), "email"),
        (lambda: worker.track("x", email="j@a.co", occurred_at="yesterday"), "ISO 8601"),
        (lambda: worker.track("x", email="j@a.co", occurred_at=12345), "occurred_at"),
        (lambda: worker.track("x", email="j@a.co", vendors=["mailchimp"]), "unknown vendor 'mailchimp'"),
        (lambda: worker.track("x", email="j@a.co", vendors="loops"), "list of vendor names"),
        (lambda: worker.track("x", email="j@a.co", vendors=[]), "vendors is empty"),
        (lambda: worker.track("x", pid="p", vendors=["conveyour"]), "cannot take"),
        (lambda: worker.identify(email="j@a.co", traits="plan=pro"), "traits must be a dict"),
        (lambda: worker.identify(email="j@a.co", traits={"nested": {"k": object()}}), "JSON"),
        (lambda: worker.segment(email="j@a.co"), "at least one segment"),
        (lambda: worker.segment(email="j@a.co", add="vip"), "list of segment names"),
        (lambda: worker.segment(email="j@a.co", add=[""]), "add"),
        (lambda: worker.segment(email="j@a.co", add=[f"s{i}" for i in range(101)]), "at most 100"),
        (lambda: worker.segment(email="j@a.co", add=[1]), "add"),
    ],
)
def test_bad_input_is_refused_clearly_and_nothing_is_enqueued(published, call, message):
    with pytest.raises(worker.InvalidEvent, match=message) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert published == []


def test_naming_a_disabled_vendor_says_which_variable_to_set(published, monkeypatch):
    monkeypatch.delenv("LOOPS_API_KEY")
    get_settings.cache_clear()
    with pytest.raises(worker.InvalidEvent, match="LOOPS_API_KEY"):
        worker.track("x", email="j@a.co", vendors=["loops"])


def test_exactly_the_cap_is_accepted(published):
    worker.track("x", email="j@a.co", properties={f"p{i}": i for i in range(15)})
    assert len(published[0][0]["properties"]) == 15


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
anything = json_values | st.sets(st.integers(), max_size=3) | st.binary(max_size=5) | st.datetimes()


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    event=st.one_of(st.text(max_size=30), st.none(), st.integers()),
    email=st.one_of(st.none(), st.emails(), st.text(max_size=10), st.integers()),
    user_id=st.one_of(st.none(), st.text(max_size=10)),
    properties=st.one_of(st.none(), st.dictionaries(st.text(max_size=10), anything, max_size=18), anything),
)
def test_any_track_call_returns_an_id_or_raises_invalid_event(published, event, email, user_id, properties):
    published.clear()  # one fixture for all examples (every vendor enabled; publish() records)
    try:
        event_id = worker.track(event, email=email, user_id=user_id, properties=properties)
    except worker.InvalidEvent:
        assert published == []
        return
    ((payload, vendors),) = published  # ConvertLoop takes any identity: an accepted call is published once
    assert payload["id"] == event_id and "convertloop" in vendors
    assert encode(parse_event(json.loads(json.dumps(payload)))) == payload  # unset fields left out, read back as None
