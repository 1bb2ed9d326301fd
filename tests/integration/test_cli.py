"""python -m worker deadletters ... as an operator runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from worker.delivery.deadletters import DeadLetter
from worker.dev.localstack import wait_until

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


def test_replay_all_for_one_vendor(store, product_env, start_worker, sandbox_client, unique_email):
    start_worker("cli-w")
    store.add(entry("loops", unique_email))
    store.add(entry("conveyour", unique_email))
    store.add(entry("loops", "m-" + unique_email, reason="malformed").model_copy(update={"event": None}))
    rc, out, _ = cli(product_env, "replay", "--all", "--vendor", "loops")
    assert rc == 0 and "1 replayed, 1 skipped" in out
    wait_until(lambda: [r for r in sandbox_client.requests(vendor="loops", status=200)
                        if unique_email in str(r["body"])])
    assert [r for r in sandbox_client.requests(vendor="conveyour") if unique_email in str(r["body"])] == []
    assert sorted(e.vendor for e in store.list()) == ["conveyour", "loops"]
    rc, _, err = cli(product_env, "replay")
    assert rc == 2 and "IDs or --all" in err


def test_show_takes_an_event_id_or_a_task_id_too(store, product_env, unique_email):
    a = store.add(entry("loops", unique_email))
    event_id = a.event_id
    b = store.add(entry("conveyour", unique_email).model_copy(  # the same event, another vendor
        update={"event_id": event_id, "task_id": f"{event_id}.conveyour"}))
    other = store.add(entry("loops", "o-" + unique_email))
    rc, out, _ = cli(product_env, "show", event_id)
    assert rc == 0
    assert [e["id"] for e in json.loads(out)] == [a.id, b.id]  # every dead letter of that event, oldest first
    rc, out, _ = cli(product_env, "show", f"{event_id}.conveyour")  # the task id Flower shows
    assert rc == 0 and [e["id"] for e in json.loads(out)] == [b.id]
    rc, out, _ = cli(product_env, "show", other.id)  # a dead-letter id: that entry, as before
    assert rc == 0 and json.loads(out)["id"] == other.id
    rc, _, err = cli(product_env, "show", "ev-nobody")
    assert rc == 1 and "no dead letter ev-nobody" in err


def test_list_error_column_has_the_vendors_message_on_one_line_without_secrets(store, product_env, unique_email):
    secret = product_env["CONVEYOUR_TOKEN"]
    message = "field 'seats' is not a number"
    plain = store.add(entry("conveyour", unique_email).model_copy(
        update={"response_body": json.dumps({"success": False, "message": message})}))
    # Written past the store (which scrubs as it writes): the CLI scrubs what it prints, too.
    raw = entry("conveyour", "r-" + unique_email).model_copy(update={
        "id": "raw" + unique_email[:8], "error": "conveyour answered 422",
        "response_body": json.dumps({"errors": [{"index": 0, "message": f"token {secret} is \x1b[31mnot allowed "
                                                                        + "x" * 300}]})})
    store.client.hset(store.hash_key, raw.id, raw.model_dump_json())
    store.client.zadd(store.index_key, {raw.id: 2e9})
    rc, out, err = cli(product_env, "list")
    assert rc == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert rows[plain.id].endswith(f"conveyour answered 422: {message}")
    cut = rows[raw.id][rows[raw.id].index("conveyour answered 422"):]
    assert cut.startswith("conveyour answered 422: token [Filtered] is [31mnot allowed xxx") and cut.endswith("…")
    assert len(cut) == 100
    assert secret not in out and "\x1b" not in out


def test_no_dead_letters_under_this_key_prefix_names_the_prefixes_that_have_some(product_env, unique_email):
    import redis

    from worker.delivery.deadletters import DeadLetterStore

    elsewhere = f"cli-demo-{unique_email[1:9]}"
    other = DeadLetterStore(redis.Redis.from_url(product_env["REDIS_URL"]), elsewhere)
    dead = other.add(entry("conveyour", unique_email))
    try:
        empty = {**product_env, "KEY_PREFIX": f"cli-empty-{unique_email[1:9]}"}
        rc, out, err = cli(empty, "list")
        assert rc == 0 and out.strip() == "no dead letters"
        assert f"KEY_PREFIX={empty['KEY_PREFIX']}" in err and f"{elsewhere} (1)" in err, err
        rc, out, err = cli(empty, "list", "--json")
        assert rc == 0 and json.loads(out) == [] and f"{elsewhere} (1)" in err
        rc, _, err = cli(empty, "show", dead.event_id)
        assert rc == 1 and f"{elsewhere} (1)" in err
        # Under the prefix that holds it: listed, and no note.
        rc, out, err = cli({**product_env, "KEY_PREFIX": elsewhere}, "list")
        assert rc == 0 and dead.id in out and "note:" not in err
    finally:
        other.purge()


def test_help_is_plain_text():
    for args in (["--help"], ["deadletters", "--help"], ["deadletters", "show", "--help"]):
        out = subprocess.run([sys.executable, "-m", "worker", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage: python -m worker" in out.stdout
        assert "`" not in out.stdout, out.stdout
    out = subprocess.run([sys.executable, "-m", "worker.demo", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--flower-port" in out.stdout and "`" not in out.stdout, out.stdout


def test_replay_takes_an_event_id(store, product_env, start_worker, sandbox_client, unique_email):
    start_worker("cli-replay-w")
    a = store.add(entry("loops", unique_email))
    b = store.add(entry("conveyour", unique_email).model_copy(update={"event_id": a.event_id}))
    kept = store.add(entry("loops", "k-" + unique_email))
    rc, out, err = cli(product_env, "replay", a.event_id)
    assert rc == 0 and "2 replayed, 0 skipped" in out, out + err
    for vendor in ("loops", "conveyour"):
        sandbox_client.wait_for(lambda r: unique_email in json.dumps(r["body"]), vendor=vendor, timeout=30)
    assert [e.id for e in store.list()] == [kept.id]
    assert f"replayed {a.id} -> loops" in out and f"replayed {b.id} -> conveyour" in out
