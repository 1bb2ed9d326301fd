"""The FastAPI example's own tests, as an app's would be: its views driven by FastAPI's ``TestClient``, the
producer calls they make — ``await worker.aio.segment(...)``, and the signup's calls published through
worker.aio when its ``AsyncSession`` commits — recorded by the ``vdw_events`` fixture (worker.testing;
docs/testing.md): no Redis, no vendor credentials, every vendor enabled for the test.
Run: ``pytest examples/fastapi_app``.
"""

from __future__ import annotations

import main
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine


@pytest.fixture
def client(vdw_events, tmp_path, monkeypatch):
    """The app on a fresh SQLite database, its lifespan run (``worker.check_configuration()`` passes while
    recording)."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
    monkeypatch.setattr(main, "engine", engine)
    monkeypatch.setattr(main, "Session", async_sessionmaker(engine, expire_on_commit=False))
    with TestClient(main.app) as client:
        yield client


def signup(client, email: str, team: str):
    return client.post("/signup", json={"email": email, "name": "Jill", "team": team})


def test_signup_identifies_and_tracks_the_user_after_the_commit(client, vdw_events):
    response = signup(client, "jill@acme.co", "acme")
    assert response.status_code == 201, response.json()
    body = response.json()
    (call,) = vdw_events.assert_tracked("signed_up", email="jill@acme.co", user_id=body["user_id"],
                                        properties={"team": "acme"})
    assert call.id == body["event"]
    vdw_events.assert_identified(email="jill@acme.co", traits={"name": "Jill", "team": "acme"})
    assert [c.operation for c in vdw_events] == ["identify", "track"]


def test_a_taken_team_name_rolls_back_and_sends_nothing(client, vdw_events):
    assert signup(client, "jill@acme.co", "acme").status_code == 201
    vdw_events.clear()
    response = signup(client, "jack@acme.co", "acme")
    assert response.status_code == 409
    assert not vdw_events.tracked("signed_up", email="jack@acme.co")
    assert len(vdw_events) == 0


def test_an_invalid_email_is_refused_as_in_production(client, vdw_events):
    response = signup(client, "not an email", "acme")
    assert response.status_code == 400 and "not an email address" in response.json()["error"]
    assert len(vdw_events) == 0


@pytest.mark.vdw_recorder(loops_mailing_lists={"vip": "list_vip", "trial": "list_trial"})  # LOOPS_MAILING_LISTS
def test_segments_view_segments_the_user(client, vdw_events):
    user_id = signup(client, "jill@acme.co", "acme").json()["user_id"]
    response = client.post("/segments", json={"email": "jill@acme.co", "add": ["vip"], "remove": ["trial"]})
    assert response.status_code == 200
    (call,) = vdw_events.assert_segmented(email="jill@acme.co", user_id=user_id, add=["vip"], remove=["trial"])
    assert call.id == response.json()["event"]
    assert call.vendors == ["convertloop", "loops", "conveyour"]  # without the lists, Loops would be skipped
