"""The compact ``worker.deliver`` message, pinned against Celery's own decoding; and the format before it still read.

Each message goes through what a stock Celery 5 worker does with it (``tests.helpers.celery_reads``): kombu's stock
Redis transport takes it, Celery's default strategy makes it a request (and the task-received event Flower shows),
and its body is decoded as Celery's trace does before running the task.
"""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import pytest

from tests.helpers import celery_reads
from tests.legacy_messages import LegacyTaskMessages
from worker.broker.tasks import deliver
from worker.envelope import TaskMessages, decode_body
from worker.keys import HEADER
from worker.retries.attempts import RetryState

EVENT_ID = "0f8fad5bd9cb469fa16570867728950e"
#: A two-property ``track`` as the producer writes it (identity nulls and all): the README's sizing event.
PAYLOAD = {"id": EVENT_ID, "identity": {"email": "user00001@example.com", "user_id": None, "pid": None},
           "created_at": "2026-12-05T16:12:38.332798Z", "operation": "track", "event": "signed_up",
           "properties": {"plan": "pro", "amount": 49}, "occurred_at": None}
PERSON = "97c7ecbe6d21ea08207e320a"


def _ours(payload: dict = PAYLOAD, vendor: str = "loops", person: str | None = PERSON) -> str:
    ((_, message),) = TaskMessages().build(payload, [vendor], persons={vendor: person} if person else None)
    return message


def test_a_stock_celery_worker_reads_the_compact_message(redis_server, product_env):
    message = _ours()
    view = celery_reads(redis_server.url, message)
    assert view["seen"] == {
        "name": "worker.deliver", "id": f"{EVENT_ID}.loops", "args": ["loops", PAYLOAD], "kwargs": {},
        "retries": 0, "eta": None, "expires": None, "time_limits": (None, None), "root_id": f"{EVENT_ID}.loops",
        "parent_id": None, "group": None, "group_index": None, "shadow": None, "callbacks": None, "errbacks": None,
        "chain": None, "chord": None, "replaced_task_nesting": 0, "stamps": {}, "exchange": "",
        "routing_key": "loops", "redelivered": False, "ignore_result": True, "retry_state": RetryState(),
        "person": PERSON,
        "flower": {"uuid": f"{EVENT_ID}.loops", "name": "worker.deliver", "retries": 0, "eta": None, "expires": None},
    }
    # Flower's args summary: the vendor and the operation (the event id is the task id's).
    assert view["request"].argsrepr == view["received"]["args"] == "('loops', <track>)"
    assert view["embed"] == {}
    assert view["context"].properties.get("body_encoding") is None  # the body as it is: JSON text, no base64


def test_a_waiting_retry_reads_as_celery_counts_it(redis_server, product_env):
    state = RetryState(2, 1767225600.5)
    message = TaskMessages().retry("loops", PAYLOAD, f"{EVENT_ID}.loops", 3, {**state.header(), HEADER: PERSON})
    seen = celery_reads(redis_server.url, message)["seen"]
    assert (seen["id"], seen["args"], seen["retries"], seen["flower"]["retries"]) == \
        (f"{EVENT_ID}.loops", ["loops", PAYLOAD], 3, 3)
    assert (seen["retry_state"], seen["person"]) == (state, PERSON)


@pytest.mark.parametrize("retries", [0, 2])
def test_what_a_worker_reads_is_what_it_read_from_the_format_before(redis_server, product_env, retries):
    """A message queued (or waiting) at an upgrade reads as its compact form does: only the args summary, which
    compact messages shorten, differs."""
    if retries:
        state = RetryState(retries, 1767225600.5)
        ours = TaskMessages().retry("loops", PAYLOAD, f"{EVENT_ID}.loops", retries, {**state.header(), HEADER: PERSON})
        # The retry header as written before: a mapping.
        headers = {"vdw_retry": {"attempts": state.attempts, "first_failure": state.first_failure}, HEADER: PERSON}
        before = LegacyTaskMessages().retry("loops", PAYLOAD, f"{EVENT_ID}.loops", retries, headers)
    else:
        ours, before = _ours(), LegacyTaskMessages().build(PAYLOAD, ["loops"], persons={"loops": PERSON})[0][1]
    views = [celery_reads(redis_server.url, raw) for raw in (ours, before)]
    seen = [view["seen"] for view in views]
    # The message before said ignore_result=false: stored in the result backend, which is disabled
    # (result_backend None): the same as ignoring it, which is the task's own setting and what ours reads as.
    assert deliver.app.conf.result_backend is None
    assert [s.pop("ignore_result") for s in seen] == [True, False]
    assert seen[0] == seen[1]
    assert seen[0]["retry_state"] == (RetryState(retries, 1767225600.5) if retries else RetryState())
    assert [view["request"].argsrepr for view in views] == ["('loops', <track>)", f"('loops', <track {EVENT_ID}>)"]


def test_the_compact_message_is_under_half_the_one_before():
    ours, legacy = _ours(), LegacyTaskMessages().build(PAYLOAD, ["loops"], persons={"loops": PERSON})[0][1]
    assert len(ours) <= 700 and len(ours) <= 0.5 * len(legacy), (len(ours), len(legacy))
    envelope = json.loads(ours)
    assert set(envelope) == {"body", "content-type", "headers", "properties"}
    assert envelope["headers"] == {"task": "worker.deliver", "id": f"{EVENT_ID}.loops",
                                   "argsrepr": "('loops', <track>)", HEADER: PERSON}
    assert set(envelope["properties"]) == {"delivery_info", "delivery_tag"}
    assert json.loads(envelope["body"]) == [["loops", PAYLOAD], {}, {}]


def test_a_retry_of_the_first_attempt_and_of_no_counted_failure_carries_no_default():
    message = json.loads(TaskMessages().retry("loops", PAYLOAD, f"{EVENT_ID}.loops", 0, {}))
    assert message["headers"] == {"task": "worker.deliver", "id": f"{EVENT_ID}.loops", "argsrepr": "('loops', <track>)"}


@pytest.mark.parametrize("build", ["compact", "before"])
def test_decode_body_reads_either_format(build):
    if build == "compact":
        message = _ours()
    else:
        ((_, message),) = LegacyTaskMessages().build(PAYLOAD, ["loops"])
    (vendor, event), kwargs, _embed = decode_body(json.loads(message))
    assert (vendor, event, kwargs) == ("loops", PAYLOAD, {})


@pytest.mark.parametrize("envelope", [
    {"body": "not json", "properties": {}},
    {"body": "bm90IGpzb24=", "properties": {"body_encoding": "base64"}},  # base64 of "not json"
    {"body": "%%%", "properties": {"body_encoding": "base64"}},
    {"body": "[]", "properties": {"body_encoding": "rot13"}},
])
def test_decode_body_refuses_what_is_neither(envelope):
    with pytest.raises(ValueError):
        decode_body(envelope)


@pytest.mark.parametrize("build", ["compact", "before"])
def test_the_probe_reads_either_format(build, client, monkeypatch, product_env):
    """The breaker's probe decodes the body itself: a waiting retry written in either format is delivered."""
    from unittest import mock

    from worker.broker import probe
    from worker.delivery.pipeline import Delivered
    from worker.retries.schedule import RetrySchedule

    schedule = RetrySchedule(client, f"probe-{build}")
    client.delete("loops", schedule.key("loops"))
    state = RetryState(1, time.time())
    if build == "compact":
        message = TaskMessages().retry("loops", PAYLOAD, f"{EVENT_ID}.loops", 1, state.header())
    else:
        header = {"vdw_retry": {"attempts": 1, "first_failure": state.first_failure}}  # a mapping, as written then
        message = LegacyTaskMessages().retry("loops", PAYLOAD, f"{EVENT_ID}.loops", 1, header)
    schedule.add("loops", message, 3600)
    calls = []

    def attempt(name, event, state, task_id, tag, retries, **kw):
        calls.append((name, event, state, task_id, retries))
        return Delivered(name, 200, state.next_attempt, 0.0)

    monkeypatch.setattr(probe, "attempt", attempt)
    assert probe.run_probe("loops", schedule, mock.Mock()) == "delivered"
    assert calls == [("loops", PAYLOAD, state, f"{EVENT_ID}.loops", 1)]
    assert schedule.waiting("loops").count == 0 and client.hlen("unacked") == 0


@pytest.mark.parametrize(("header", "state"), [
    ([2, 1767225600.5], RetryState(2, 1767225600.5)),
    ({"attempts": 2, "first_failure": 1767225600.5}, RetryState(2, 1767225600.5)),  # as written before
    ([0, None], RetryState()),
    (None, RetryState()),
    ([2], RetryState()),
    ("2", RetryState()),
    ([-1, "soon"], RetryState()),
])
def test_the_retry_header_reads_in_either_form(header, state):
    assert RetryState.from_headers({"vdw_retry": header}) == state


def test_the_envelope_imports_neither_celery_nor_kombu():
    """A web process builds messages without Celery: worker/envelope.py imports the standard library and
    worker.keys only."""
    path = Path(__file__).resolve().parents[2] / "worker" / "envelope.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    assert names <= {"__future__", "base64", "json", "os", "collections.abc", "typing", ".keys"}, names
