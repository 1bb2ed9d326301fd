"""Credentials are filtered from texts however an error message quotes them (README: "No credential reaches ...
logs, dead letters, Flower or Sentry")."""

from __future__ import annotations

import json

import pytest

from worker.scrub import FILTERED, scrub, scrub_obj

KEY = "zzloopsapikey-0123456789abcdef"


@pytest.mark.parametrize("secret", [KEY, KEY + "\n", " " + KEY + "\r\n", KEY + "\x00"])
@pytest.mark.parametrize("quote", [
    lambda s: f"Bearer {s}",                                   # as it is
    lambda s: f"Illegal header value {s.encode()!r}",          # h11 / httpx: the bytes' repr
    lambda s: f"bad value {s!r}",                              # the str's repr
    lambda s: json.dumps({"error": f"Illegal header value {s.encode()!r}"}),  # a dead letter as stored (JSON)
], ids=["raw", "bytes-repr", "str-repr", "json"])
def test_a_credential_is_filtered_however_it_is_quoted(secret, quote):
    text = quote(secret)
    assert KEY in text
    scrubbed = scrub(text, [secret])
    assert KEY not in scrubbed and FILTERED in scrubbed, scrubbed


def test_scrub_obj_filters_nested_values_and_leaves_other_text_alone():
    event = {"message": f"Illegal header value b'{KEY}\\n'", "extra": [{"k": KEY}], "n": 1}
    assert scrub_obj(event, [KEY + "\n"]) == {"message": f"Illegal header value b'{FILTERED}'",
                                               "extra": [{"k": FILTERED}], "n": 1}
    assert scrub("nothing secret here", [KEY]) == "nothing secret here"
    assert scrub("anything", ["", "   "]) == "anything"
