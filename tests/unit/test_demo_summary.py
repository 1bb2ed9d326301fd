"""The demo's summary is computed from the sandbox's records, event by event; every --help is plain text."""

from __future__ import annotations

import argparse

import pytest

from worker.delivery.deadletters import DeadLetter, vendor_message
from worker.dev import demo
from worker.ops import cli

VENDORS = ["convertloop", "loops", "conveyour"]


def rec(seq: int, vendor: str, status: int, body: object, key: str | None = None, path: str = "/x") -> dict:
    return {"seq": seq, "vendor": vendor, "method": "POST", "path": path, "status": status, "body": body,
            "idempotency_key": key}


@pytest.mark.parametrize(("statuses", "text"), [
    ([503, 200], "answered 503, then 200: delivered on attempt 2"),
    ([200], "answered 200: delivered on attempt 1, without a retry"),
    ([503, 500, 409], "answered 503, then 500, then 409: delivered on attempt 3"),
    ([503, 503], "answered 503, then 503: not delivered after 2 attempt(s)"),
    ([], "no request reached the vendor"),
])
def test_attempts_text_says_what_the_statuses_say(statuses, text):
    assert demo.attempts_text(statuses) == text


def test_a_503_that_hit_another_event_is_not_reported_as_this_events_retry():
    """The issue's run: the 503 went to the sale at Loops; the 'upgraded' event was delivered at once."""
    records = [
        rec(1, "loops", 503, {"eventName": "made_sale"}, key="sale"),
        rec(2, "loops", 200, {"eventName": "upgraded"}, key="up"),
        rec(3, "loops", 200, {"eventName": "made_sale"}, key="sale"),
    ]
    upgraded = [r["status"] for r in demo.event_report(records, ["loops"], "up")["loops"]]
    sale = [r["status"] for r in demo.event_report(records, ["loops"], "sale")["loops"]]
    assert demo.attempts_text(upgraded) == "answered 200: delivered on attempt 1, without a retry"
    assert demo.attempts_text(sale) == "answered 503, then 200: delivered on attempt 2"


def test_an_events_lines_count_only_its_own_requests_and_the_totals_are_labelled():
    records = [
        rec(1, "convertloop", 200, {"name": "made_sale"}, path="/event_logs"),
        rec(2, "convertloop", 200, {"email": "j@x"}, path="/people"),
        rec(3, "loops", 200, {"eventName": "made_sale"}, key="sale", path="/events/send"),
        rec(4, "loops", 503, {"eventName": "upgraded"}, key="up", path="/events/send"),
        rec(5, "conveyour", 200, [{"id": "jill"}, {"id": "jill"}], path="/analytics/identify"),
        rec(6, "conveyour", 422, {"id": "jill", "events": [{"event": "made_sale"}]}, path="/analytics/track"),
    ]
    lines = demo.delivery_lines("ev1", "track made_sale", demo.event_report(records, VENDORS, '"made_sale"'))
    assert lines[0] == ("delivered: event ev1 (track made_sale) NOT delivered to conveyour; "
                        "each vendor's requests for this event:")
    assert lines[1].split() == ["convertloop", "POST", "/event_logs", "answered", "200:", "delivered", "on", "attempt",
                                "1,", "without", "a", "retry"]
    assert "/events/send" in lines[2] and "503" not in lines[2]
    assert lines[3].endswith("answered 422: not delivered after 1 attempt(s)")
    assert demo.totals_line(records, VENDORS) == (
        "all requests of this run (every event): convertloop 2x200; loops 1x200, 1x503; conveyour 1x200, 1x422")
    assert sum(demo.calls(r) for r in records if r["vendor"] == "conveyour") == 3


def test_every_vendor_delivered_says_so():
    records = [rec(i, v, 200, {"name": "made_sale"}) for i, v in enumerate(VENDORS)]
    lines = demo.delivery_lines("ev1", "track made_sale", demo.event_report(records, VENDORS, '"made_sale"'))
    assert "to every vendor" in lines[0]


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_help_text_is_plain():
    helps = [p.format_help() for p in [*_parsers(cli.parser()), demo.parser()]]
    assert len(helps) >= 12
    for text in helps:
        assert "`" not in text and ":meth:" not in text, text


@pytest.mark.parametrize(("body", "message"), [
    ('{"success": false, "message": "field \'seats\' is not a number"}', "field 'seats' is not a number"),
    ('{"errors": [{"index": 0, "message": "id is required"}, {"index": 2, "message": "bad tag"}]}',
     "id is required; bad tag"),
    ('{"error": {"detail": "deep"}}', "deep"),
    ('{"unexpected": 1}', '{"unexpected":1}'),
    ("Bad Gateway\n\x1b[31m<html>", "Bad Gateway [31m<html>"),
    ("", None),
    (None, None),
])
def test_vendor_message(body, message):
    assert vendor_message(body) == message


def test_error_text_adds_the_message_once_scrubs_and_cuts():
    entry = DeadLetter(vendor="conveyour", operation="identify", reason="rejected", status=422, attempts=1,
                       event_id="e", error="conveyour answered 422", response_body='{"message": "key s3cr3t bad"}')
    assert cli.error_text(entry, ["s3cr3t"]) == "conveyour answered 422: key [Filtered] bad"
    said = entry.model_copy(update={"error": "conveyour answered 422: key s3cr3t bad"})
    assert cli.error_text(said, ["s3cr3t"]) == "conveyour answered 422: key [Filtered] bad"
    long = entry.model_copy(update={"response_body": '{"message": "' + "y" * 500 + '"}'})
    cut = cli.error_text(long, [], width=40)
    assert len(cut) == 40 and cut.endswith("…") and cut.startswith("conveyour answered 422: yyy")


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:hunter2@127.0.0.1:6380/0", "redis://:***@127.0.0.1:6380/0"),
    ("rediss://ops:hunter2@[::1]:7000/1", "rediss://ops:***@[::1]:7000/1"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_the_demo_never_prints_a_redis_password(url, shown):
    assert demo.shown_url(url) == shown
