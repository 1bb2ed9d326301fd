"""Hostile producer input, against a real Redis: every identify / track / segment call returns an event id
or raises ``worker.InvalidEvent`` — nothing else escapes — and what lands in the vendor queues is exactly
what was asked for.

The queue entries are decoded generically, as any Celery worker would read them: the kombu envelope (JSON)
-> its body (decoded by its ``body_encoding`` if it has one, then by its content type, with kombu's own codecs)
-> the Celery protocol-2 body ``[args, kwargs, embed]`` with ``args == [vendor, event]``.
Nothing here depends on how the producer builds or writes its messages.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, note
from hypothesis import event as hevent
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from kombu.serialization import loads
from kombu.transport import virtual

import worker
from worker.events import parse_event
from worker.settings import get_settings
from worker.vendors import VENDORS

pytestmark = pytest.mark.integration

QUEUES = tuple(VENDORS)
#: Examples per operation: at least 1000 calls in all.
EXAMPLES = {"identify": 340, "track": 400, "segment": 300}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
def queues(product_env):
    client = redis.Redis.from_url(product_env["REDIS_URL"])
    client.delete(*QUEUES)
    yield client
    client.delete(*QUEUES)
    client.close()


def decode(raw: bytes) -> dict[str, Any]:
    """One queue entry -> {task, id, args, kwargs}, the way a Celery worker reads it."""
    envelope = json.loads(raw)
    assert envelope["content-type"] == "application/json"
    body, encoding = envelope["body"], envelope["properties"].get("body_encoding")
    if encoding:
        body = virtual.Channel.codecs[encoding].decode(body)
    args, kwargs, embed = loads(body, envelope["content-type"], envelope.get("content-encoding"),
                                accept={"application/json"})
    assert isinstance(embed, dict)
    return {"task": envelope["headers"]["task"], "id": envelope["headers"]["id"], "args": args, "kwargs": kwargs,
            "routing_key": envelope["properties"]["delivery_info"]["routing_key"]}


def drain(client: redis.Redis) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for queue in QUEUES:
        entries = client.lrange(queue, 0, -1)
        client.delete(queue)
        out[queue] = [decode(e) for e in entries]
    return out


NOT_A_MAPPING = object()  # equal to nothing: accepting a non-mapping would fail the round trip


def mapping_as_queued(value: Any) -> Any:
    """What a mapping argument must look like on the queue: JSON-equal to it (None means empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        return NOT_A_MAPPING
    return json.loads(json.dumps(value, allow_nan=False))


def call_and_check(client: redis.Redis, op: str, kwargs: dict[str, Any], expect: Any) -> None:
    """Make the call; then either InvalidEvent and empty queues, or the event on exactly the right queues."""
    try:
        event_id = getattr(worker, op)(**kwargs)
    except worker.InvalidEvent as exc:
        hevent(f"{op}: InvalidEvent")
        note(f"refused: {exc}")
        assert isinstance(exc, ValueError) and str(exc)
        assert drain(client) == {q: [] for q in QUEUES}, "refused, yet something was enqueued"
        return
    assert isinstance(event_id, str) and event_id
    got = drain(client)
    targets = [q for q in QUEUES if got[q]]
    events = []
    for queue in targets:
        (message,) = got[queue]
        assert message["task"] == "worker.deliver" and message["routing_key"] == queue
        assert message["id"] == f"{event_id}.{queue}"
        assert message["kwargs"] == {}
        vendor, event = message["args"]
        assert vendor == queue
        events.append(event)
    assert events, "accepted but enqueued nowhere"
    hevent(f"{op}: accepted for {len(targets)} vendor(s)")
    event = events[0]
    assert all(e == event for e in events), "vendors got different events"

    # Round trip: what is on the queue is what was asked for.
    assert event["id"] == event_id and event["operation"] == op
    identity = {k: kwargs[k] for k in ("email", "user_id", "pid") if kwargs.get(k) is not None}
    assert {k: v for k, v in event["identity"].items() if v is not None} == identity
    for key, value in expect().items():  # computed only for accepted input
        assert event[key] == value, f"{key}: queued {event[key]!r}, asked for {value!r}"
    if op == "track" and kwargs.get("occurred_at") is not None:
        asked = kwargs["occurred_at"]
        asked = asked if asked.tzinfo else asked.replace(tzinfo=UTC)
        assert datetime.fromisoformat(event["occurred_at"].replace("Z", "+00:00")) == asked
    parsed = parse_event(event)  # the worker will accept it

    # The right vendors: those named, else every enabled vendor that can carry the event.
    if kwargs.get("vendors") is not None:
        assert targets == [q for q in QUEUES if q in kwargs["vendors"]]
    else:
        settings = get_settings()
        assert targets == [q for q, v in VENDORS.items() if v.enabled(settings) and v.refusal(parsed, settings) is None]


# -- strategies: a mix of plausible input (so that many calls are accepted and round-trip) and hostile input

def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(good, good, bad)


finite = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
          | st.text(max_size=20))
scalars = finite | st.floats(allow_nan=True, allow_infinity=True)
json_like = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
good_json = st.recursive(
    finite,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
not_json = st.sets(st.integers(), max_size=3) | st.binary(max_size=5) | st.datetimes() | st.builds(object)
anything = json_like | not_json
mappings = mostly(
    st.none() | st.dictionaries(st.text(min_size=1, max_size=12), good_json, max_size=15),
    st.one_of(
        st.dictionaries(st.text(max_size=12), json_like, max_size=17),
        st.dictionaries(st.text(max_size=5), anything, max_size=4),
        st.dictionaries(st.integers(), st.integers(), max_size=2),
        st.just({"big": "x" * 40_000}),
        anything,
    ),
)
ids = st.text(min_size=1, max_size=12).filter(str.strip)
identities = mostly(
    st.fixed_dictionaries({"email": st.emails()}, optional={"user_id": ids, "pid": ids})
    | st.fixed_dictionaries({"user_id": ids}, optional={"pid": ids})
    | st.fixed_dictionaries({"pid": ids}),
    st.fixed_dictionaries({}, optional={
        "email": st.none() | st.text(max_size=12) | st.integers() | st.just("a@b.co " * 3) | st.just("a@b" + "c" * 600),
        "user_id": st.none() | st.text(max_size=12) | st.integers() | st.just("x" * 600) | st.just("  "),
        "pid": st.none() | st.text(max_size=12) | st.booleans(),
    }),
)
vendor_lists = mostly(
    st.none() | st.lists(st.sampled_from(QUEUES), min_size=1, max_size=3),
    st.lists(st.sampled_from([*QUEUES, "mailchimp", "", 3]), max_size=4) | st.text(max_size=6) | st.integers(),
)
event_names = mostly(ids, st.text(max_size=20) | st.none() | st.integers() | st.just("e" * 300))
good_names = st.sampled_from(["vip", "trial", "newsletter"]) | ids  # mapped to a Loops list, or not
bad_names = st.text(max_size=12) | st.integers() | st.none() | st.just("s" * 300)
name_lists = mostly(st.lists(good_names, min_size=1, max_size=4),
                    st.lists(good_names | bad_names, max_size=3) | st.just(()) | st.text(max_size=4) | st.none()
                    | st.integers() | st.lists(good_names, min_size=101, max_size=102))
occurred = mostly(st.none() | st.datetimes(timezones=st.none() | st.timezones()), st.text(max_size=8) | st.integers())


@hsettings(max_examples=EXAMPLES["identify"], **SETTINGS)
@given(identity=identities, traits=mappings, vendors=vendor_lists)
def test_identify_returns_an_id_or_invalid_event_and_round_trips(queues, identity, traits, vendors):
    kwargs = {**identity, "traits": traits, "vendors": vendors}
    call_and_check(queues, "identify", kwargs, lambda: {"traits": mapping_as_queued(traits)})


@hsettings(max_examples=EXAMPLES["track"], **SETTINGS)
@given(identity=identities, event=event_names, properties=mappings, occurred_at=occurred, vendors=vendor_lists)
def test_track_returns_an_id_or_invalid_event_and_round_trips(queues, identity, event, properties, occurred_at,
                                                              vendors):
    kwargs = {**identity, "event": event, "properties": properties, "occurred_at": occurred_at, "vendors": vendors}
    call_and_check(queues, "track", kwargs, lambda: {"event": event, "properties": mapping_as_queued(properties)})


@hsettings(max_examples=EXAMPLES["segment"], **SETTINGS)
@given(identity=identities, add=name_lists, remove=st.just(()) | name_lists, vendors=vendor_lists)
def test_segment_returns_an_id_or_invalid_event_and_round_trips(queues, identity, add, remove, vendors):
    kwargs = {**identity, "add": add if add is not None else (), "remove": remove if remove is not None else (),
              "vendors": vendors}
    call_and_check(queues, "segment", kwargs, lambda: {"add": list(kwargs["add"]), "remove": list(kwargs["remove"])})
