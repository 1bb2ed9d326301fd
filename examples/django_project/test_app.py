"""The Django example's own tests, as an app's would be: a ``django.test.TestCase`` driving the views with
Django's test client, the producer calls recorded by the ``vdw_events`` fixture (worker.testing;
docs/testing.md) — no Redis, no vendor credentials, every vendor enabled for the test.
Run: ``pytest examples/django_project`` (conftest.py sets Django up).

A ``TestCase`` runs each test in a transaction it rolls back, so ``transaction.on_commit`` callbacks — the
signup's ``worker.oncommit.django`` calls — never run by themselves: ``captureOnCommitCallbacks(execute=True)``
runs them as a commit would, and only then are they recorded.
"""

from __future__ import annotations

import json

import pytest
from django.test import TestCase


class SignupTests(TestCase):
    @pytest.fixture(autouse=True)
    def _events(self, vdw_events):
        self.events = vdw_events

    def signup(self, email: str, team: str):
        with self.captureOnCommitCallbacks(execute=True):
            return self.client.post("/signup", json.dumps({"email": email, "name": "Jill", "team": team}),
                                    content_type="application/json")

    def test_signup_identifies_and_tracks_the_user_after_the_commit(self):
        response = self.signup("jill@acme.co", "acme")
        assert response.status_code == 201, response.content
        body = response.json()
        (call,) = self.events.assert_tracked("signed_up", email="jill@acme.co", user_id=body["user_id"],
                                             properties={"team": "acme"})
        assert call.id == body["event"]
        self.events.assert_identified(email="jill@acme.co", traits={"name": "Jill", "team": "acme"})
        assert [c.operation for c in self.events] == ["identify", "track"]

    def test_nothing_is_recorded_until_the_transaction_commits(self):
        with self.captureOnCommitCallbacks(execute=False) as callbacks:
            response = self.client.post("/signup", json.dumps({"email": "jill@acme.co", "name": "Jill",
                                                               "team": "acme"}), content_type="application/json")
        assert response.status_code == 201
        assert len(callbacks) == 2 and len(self.events) == 0  # waiting for a commit that a TestCase never makes

    def test_a_taken_team_name_rolls_back_and_sends_nothing(self):
        assert self.signup("jill@acme.co", "acme").status_code == 201
        self.events.clear()
        response = self.signup("jack@acme.co", "acme")
        assert response.status_code == 409
        assert not self.events.tracked("signed_up", email="jack@acme.co")
        assert len(self.events) == 0

    def test_an_invalid_email_is_refused_as_in_production(self):
        response = self.signup("not an email", "acme")
        assert response.status_code == 400 and "not an email address" in response.json()["error"]
        assert len(self.events) == 0

    @pytest.mark.vdw_recorder(loops_mailing_lists={"vip": "list_vip", "trial": "list_trial"})  # LOOPS_MAILING_LISTS
    def test_segments_view_segments_the_user(self):
        user_id = self.signup("jill@acme.co", "acme").json()["user_id"]
        response = self.client.post("/segments", json.dumps({"email": "jill@acme.co", "add": ["vip"],
                                                             "remove": ["trial"]}),
                                    content_type="application/json")
        assert response.status_code == 200
        (call,) = self.events.assert_segmented(email="jill@acme.co", user_id=user_id, add=["vip"], remove=["trial"])
        assert call.id == response.json()["event"]
        assert call.vendors == ["convertloop", "loops", "conveyour"]  # without the lists, Loops would be skipped
