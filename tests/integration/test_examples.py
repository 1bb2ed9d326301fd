"""The web examples under their real servers: Flask under gunicorn, FastAPI under uvicorn, Django under runserver.

Each is driven over HTTP (signup, segments, bad input), against a real worker, the
private Redis and the sandbox; the deliveries are found at the sandbox. A signup whose
transaction rolls back (its team name is taken: an IntegrityError after the calls were
made) delivers nothing: the same person's later, committed signup is delivered and the
workers go idle, and then each vendor holds exactly one signup for that person — the
committed one. ``python -m worker.devstack`` (the examples' one command) runs a command
against a stack of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from worker.dev.localstack import AppServer

from ..helpers import wait_idle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _server(kind: str, env: dict[str, str], tmp: Path) -> AppServer:
    py = sys.executable
    if kind == "flask":
        env = {**env, "DATABASE_URL": f"sqlite:///{tmp / 'flask.db'}"}
        return AppServer([py, "-m", "gunicorn", "--chdir", str(EXAMPLES / "flask_app"), "-b", "127.0.0.1:{port}",
                          "app:app"], env, tmp / "gunicorn.log")
    if kind == "fastapi":
        env = {**env, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'fastapi.db'}"}
        return AppServer([py, "-m", "uvicorn", "--app-dir", str(EXAMPLES / "fastapi_app"), "--host", "127.0.0.1",
                          "--port", "{port}", "main:app"], env, tmp / "uvicorn.log")
    project = EXAMPLES / "django_project"
    env = {**env, "DJANGO_DB": str(tmp / "django.sqlite3")}
    subprocess.run([py, "manage.py", "migrate", "--verbosity", "0"], cwd=project, env=env, check=True, timeout=120)
    return AppServer([py, "manage.py", "runserver", "--noreload", "127.0.0.1:{port}"], env, tmp / "runserver.log",
                     cwd=project)


@pytest.fixture(scope="module")
def consumer(worker_factory):
    return worker_factory("examples")


@pytest.fixture(params=["flask", "fastapi", "django"])
def app(request, consumer, product_env, sandbox_client, tmp_path, leak_watch):
    server = _server(request.param, product_env, tmp_path)
    try:
        server.start()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield client
    finally:
        server.stop()
        leak_watch.add_log(server.log_path)  # the web server's log too must hold no credential


SIGNUP_PATHS = {"convertloop": "/event_logs", "loops": "/events/send", "conveyour": "/analytics/track"}


def _delivered(sandbox_client) -> list[tuple[str, str, str]]:
    """(vendor, path, body as JSON text) of every call the sandbox answered 200; a bulk request counts as its calls."""
    out = []
    for record in sandbox_client.requests(status=200):
        for body in record["body"] if isinstance(record["body"], list) else [record["body"]]:
            out.append((record["vendor"], record["path"], json.dumps(body)))
    return out


def _signups_mentioning(sandbox_client, text: str) -> dict[str, int]:
    """Per vendor, how many signed_up events mention ``text`` (their properties name the team)."""
    counts = {vendor: 0 for vendor in SIGNUP_PATHS}
    for vendor, path, body in _delivered(sandbox_client):
        if path == SIGNUP_PATHS[vendor] and "signed_up" in body and text in body:
            counts[vendor] += 1
    return counts


def test_signup_and_segments_are_delivered_to_every_vendor(app, sandbox_client, product_env):
    email = f"jill-{uuid.uuid4().hex[:8]}@example.com"
    r = app.post("/signup", json={"email": email, "name": "Jill", "team": f"team-{email}"})
    assert r.status_code == 201, r.text
    user_id = r.json()["user_id"]
    r = app.post("/segments", json={"email": email, "add": ["vip"], "remove": ["trial"]})
    assert r.status_code == 200, r.text

    def calls() -> dict[str, list[tuple[str, dict]]]:
        """Per vendor, (path, body) of the calls about this person (ConveYour knows them by user id)."""
        out: dict[str, list[tuple[str, dict]]] = {}
        for vendor, path, body in _delivered(sandbox_client):
            if (user_id if vendor == "conveyour" else email) in body:
                out.setdefault(vendor, []).append((path, json.loads(body)))
        return out

    # identify + signed_up + segment: three calls at each vendor
    sandbox_client.wait_for(lambda r: all(len(calls().get(v, [])) >= 3 for v in SIGNUP_PATHS), status=None,
                            timeout=60)
    wait_idle(product_env["REDIS_URL"], timeout=60)
    got = calls()
    assert {v: len(c) for v, c in got.items()} == {v: 3 for v in SIGNUP_PATHS}
    assert [p for p, _ in got["loops"]].count("/contacts/update") == 2
    assert any(b.get("mailingLists") == {"list_vip": True, "list_trial": False} for _, b in got["loops"])
    assert any(b.get("add_to_segments") == ["vip"] for _, b in got["convertloop"])
    assert any(b.get("traits", {}).get("name") == "Jill" for p, b in got["conveyour"] if p == "/analytics/identify")


def test_a_rolled_back_signup_delivers_nothing(app, sandbox_client, product_env):
    taken, other = f"taken-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    first = f"first-{uuid.uuid4().hex[:8]}@example.com"
    second = f"second-{uuid.uuid4().hex[:8]}@example.com"
    assert app.post("/signup", json={"email": first, "name": "First", "team": taken}).status_code == 201
    # The taken team name: the calls are made, then the transaction fails and rolls back.
    r = app.post("/signup", json={"email": second, "name": "Rolled Back", "team": taken})
    assert r.status_code == 409, r.text
    # The same person again, committed this time: the positive signal to wait for.
    r = app.post("/signup", json={"email": second, "name": "Committed", "team": other})
    assert r.status_code == 201, r.text
    sandbox_client.wait_for(lambda r: min(_signups_mentioning(sandbox_client, other).values()) >= 1,
                            status=None, timeout=60)
    wait_idle(product_env["REDIS_URL"], timeout=60)

    assert _signups_mentioning(sandbox_client, other) == {v: 1 for v in SIGNUP_PATHS}
    assert _signups_mentioning(sandbox_client, taken) == {v: 1 for v in SIGNUP_PATHS}  # the first person's only
    rolled_back = [(v, path) for v, path, body in _delivered(sandbox_client) if "Rolled Back" in body]
    assert rolled_back == [], f"the rolled-back signup reached {rolled_back}"
    assert any("Committed" in body for v, path, body in _delivered(sandbox_client) if v == "conveyour")


def test_bad_input_is_a_400_with_the_reason(app, product_env):
    email = f"bad-{uuid.uuid4().hex[:8]}@example.com"
    assert app.post("/signup", json={"email": email, "name": "Bad", "team": f"t-{email}"}).status_code == 201
    r = app.post("/segments", json={"email": email, "add": [""]})
    assert r.status_code == 400 and "add" in r.json()["error"], r.text
    r = app.post("/signup", json={"email": "not-an-email", "name": "X", "team": f"t2-{email}"})
    assert r.status_code == 400 and "email" in r.json()["error"], r.text


def test_devstack_runs_a_command_against_a_stack_of_its_own(tmp_path):
    script = """
import os, time, httpx, worker
event_id = worker.track("devstack_check", email="jill@acme.co")
box = os.environ["SANDBOX_URL"]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    records = httpx.get(box + "/_sandbox/requests", params={"status": 200}).json()["requests"]
    if len(records) >= 3:
        print("delivered", sorted(r["vendor"] for r in records), flush=True)
        break
    time.sleep(0.1)
"""
    done = subprocess.run([sys.executable, "-m", "worker.devstack", "--", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "delivered ['convertloop', 'conveyour', 'loops']" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "stopped  redis, sandbox and worker" in done.stderr
