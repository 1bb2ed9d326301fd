"""Credential scrubbing and the DeadLettered exception Flower and Sentry show."""

from __future__ import annotations

import pickle

from worker.errors import DeadLettered
from worker.observability import before_send
from worker.scrub import scrub_obj
from worker.settings import Settings


def test_before_send_scrubs_every_credential_anywhere():
    settings = Settings(_env_file=None, loops_api_key="lk-123", convertloop_app_id="app", convertloop_api_key="ck-9")
    secrets = settings.secrets()
    event = {
        "message": "auth Bearer lk-123 failed",
        "extra": {"headers": {"Authorization": "Basic app:ck-9"}, "list": ["x lk-123", 3, None]},
        "tags": {"vendor": "loops"},
    }
    cleaned = before_send(event, {}, secrets=secrets)
    text = repr(cleaned)
    assert "lk-123" not in text and "ck-9" not in text
    assert cleaned["message"] == "auth Bearer [Filtered] failed"
    assert cleaned["extra"]["list"] == ["x [Filtered]", 3, None]
    assert cleaned["tags"] == {"vendor": "loops"}


def test_settings_repr_hides_credentials():
    s = Settings(_env_file=None, loops_api_key="lk-123")
    assert "lk-123" not in repr(s) and "lk-123" not in str(s.model_dump())
    assert s.secrets() == ["lk-123"]


def test_dead_lettered_names_vendor_status_and_reason_and_pickles():
    exc = DeadLettered("loops", 422, "rejected", "abc")
    assert str(exc) == "loops: status=422 reason=rejected dead_letter=abc"
    again = pickle.loads(pickle.dumps(exc))
    assert (again.vendor, again.status, again.reason, again.entry_id) == ("loops", 422, "rejected", "abc")
    assert "status=-" in str(DeadLettered("loops", None, "retries_exhausted", "x"))


def test_scrub_obj_keeps_structure():
    assert scrub_obj({"a": ("s1", "t")}, ["s1"]) == {"a": ("[Filtered]", "t")}
