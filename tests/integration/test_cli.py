"""python -m worker deadletters ... as an operator runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from worker.deadletters import DeadLetter
from worker.localstack import wait_until

pytestmark = pytest.mark.integration


def cli(env, *args):
    out = subprocess.run([sys.executable, "-m", "worker", "deadletters", *args], env=env,
                         capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout, out.stderr


def entry(vendor: str, email: str, reason: str = "rejected") -> DeadLetter:
    event = {"id": f"ev-{vendor}-{email}", "operation": "identify", "created_at": "2026-01-01T00:00:00Z",
             "identity": {"email": email}, "traits": {"plan": "pro"}}
    return DeadLetter(vendor=vendor, operation="identify", reason=reason, status=422, attempts=1,
                      event_id=event["id"], error=f"{vendor} answered 422", response_body='{"error": "x"}', event=event)


def test_list_json_show_and_purge(store, product_env, unique_email):
    a = store.add(entry("loops", unique_email))
    b = store.add(entry("conveyour", unique_email))
    rc, out, _ = cli(product_env, "list", "--json")
    assert rc == 0
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [a.id, b.id]
    for key in ("id", "vendor", "operation", "reason", "status", "attempts", "event_id", "failed_at", "response_body"):
        assert key in rows[0]
    rc, out, _ = cli(product_env, "list", "--vendor", "loops")
    assert rc == 0 and a.id in out and b.id not in out and "1 dead letter(s)" in out
    rc, out, _ = cli(product_env, "show", b.id)
    assert rc == 0 and json.loads(out)["event"]["identity"]["email"] == unique_email
    rc, _, err = cli(product_env, "show", "nope")
    assert rc == 1 and "no dead letter nope" in err
    rc, out, _ = cli(product_env, "purge", "--vendor", "conveyour")
    assert rc == 0 and "1 dead letter(s) purged" in out
    assert [e.id for e in store.list()] == [a.id]


def test_replay_all_for_one_vendor(store, product_env, worker_factory, sandbox_client, unique_email):
    worker_factory("cli-w")
    store.add(entry("loops", unique_email))
    store.add(entry("conveyour", unique_email))
    store.add(entry("loops", "m-" + unique_email, reason="malformed").model_copy(update={"event": None}))
    rc, out, _ = cli(product_env, "replay", "--all", "--vendor", "loops")
    assert rc == 0 and "1 replayed, 1 skipped" in out
    wait_until(lambda: [r for r in sandbox_client.requests(vendor="loops", status=200) if unique_email in str(r["body"])])
    assert [r for r in sandbox_client.requests(vendor="conveyour") if unique_email in str(r["body"])] == []
    assert sorted(e.vendor for e in store.list()) == ["conveyour", "loops"]
    rc, _, err = cli(product_env, "replay")
    assert rc == 2 and "IDs or --all" in err

