"""A vendor key that stops working pauses the vendor instead of dead-lettering every event.

Real workers (two processes), the private Redis, the sandbox over HTTP, Sentry stubbed. Under steady Loops traffic
the Loops key is revoked at the sandbox (``revoke_key``: Loops' own 401 to every request) until the test has seen
the pause and three refused probes, then restored. No bound on time or rate is
asserted: the figures are printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

import worker
from tests.helpers import wait_idle
from worker.delivery.deadletters import DeadLetterStore
from worker.dev.localstack import wait_until
from worker.ops.status import vendor_status
from worker.sandbox import SANDBOX_CREDENTIALS

from .test_sentry import SentryStub

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Events sent, and the spacing between them (about 30 s of steady traffic).
EVENTS, SPACING = 60, 0.5
THRESHOLD, PROBE_INTERVAL = 3, 2


def tags_of(event: dict) -> dict:
    tags = event.get("tags") or {}
    return tags if isinstance(tags, dict) else dict(tags)


def test_a_refused_key_pauses_the_vendor_and_a_restored_key_delivers_the_rest(
        worker_factory, product_env, sandbox_client, store, unique_email, leak_watch):
    tag = unique_email
    sentry = SentryStub()
    env = {"AUTH_FAILURE_THRESHOLD": THRESHOLD, "AUTH_PROBE_INTERVAL": PROBE_INTERVAL, "SENTRY_DSN": sentry.dsn}
    workers = [worker_factory(f"auth{i}", **env) for i in range(2)]
    events: list[str] = []
    stop = threading.Event()

    def steady() -> None:
        for i in range(EVENTS):
            events.append(worker.track("sale", email=f"{i}-{tag}", vendors=["loops"]))
            if stop.wait(SPACING):
                return

    def answers(status: int | None = None) -> list[dict]:
        mine = set(events)
        return [r for r in sandbox_client.requests(vendor="loops", status=status) if r["idempotency_key"] in mine]

    def dead() -> list:
        mine = set(events)
        return [d for d in DeadLetterStore.default().list() if d.event_id in mine]

    producer = threading.Thread(target=steady, daemon=True)
    try:
        producer.start()
        wait_until(lambda: len(answers(200)) >= 8, timeout=60, interval=0.2, message="steady deliveries first")
        sandbox_client.configure("loops", revoke_key=True)  # the key is refused from now on
        refused_at = time.time()

        paused = wait_until(lambda: (s := vendor_status()["vendors"]["loops"])["auth_failed"] and s, timeout=60,
                            interval=0.1, message="status to show the Loops pause")
        out = subprocess.run([sys.executable, "-m", "worker", "status", "--json"], env=product_env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)["vendors"]["loops"]
        table = subprocess.run([sys.executable, "-m", "worker", "status"], env=product_env,
                               capture_output=True, text=True, timeout=60).stdout
        dead_at_pause = len(dead())
        refused_at_pause = len(answers(401))

        # Paused: the probes (one real delivery each, PROBE_INTERVAL apart) are refused and go back to the queue.
        wait_until(lambda: len(answers(401)) >= refused_at_pause + 3, timeout=60, interval=0.2,
                   message="three refused probes while paused")
        during = vendor_status()["vendors"]["loops"]
        sandbox_client.configure("loops", revoke_key=False)  # the key works again
        restored_at = time.time()

        producer.join(timeout=EVENTS * SPACING + 60)
        assert not producer.is_alive()
        n = len(events)

        def accounted() -> bool:
            return len({r["idempotency_key"] for r in answers(200)} | {d.event_id for d in dead()}) >= n

        wait_until(accounted, timeout=120, interval=0.5, message=f"each of the {n} events delivered or dead-lettered")
        wait_idle(product_env["REDIS_URL"], timeout=60)
        wait_until(lambda: any(tags_of(e).get("reason") == "auth_failed" for e in sentry.events()), timeout=30,
                   message="the Sentry event of the pause")
        after = vendor_status()["vendors"]["loops"]
    finally:
        stop.set()
        sandbox_client.configure("loops", revoke_key=False)
        for w in workers:
            w.stop()
        sentry.server.shutdown()
        leak_watch.add_text("sentry envelopes (auth pause)", b"\n".join(sentry.raw), kind="sentry")

    delivered = {r["idempotency_key"] for r in answers(200)}
    dead_letters = dead()
    dead_ids = {d.event_id for d in dead_letters}
    refused = answers(401)
    first_after = min(r["ts"] for r in answers(200) if r["ts"] >= restored_at)
    last = max(r["ts"] for r in answers(200))
    logs = "".join(w.log() for w in workers)
    pause_lines = [line for line in logs.splitlines() if "the vendor refuses the credentials" in line]
    reports = [e for e in sentry.events() if tags_of(e).get("reason") == "auth_failed"]
    print(f"\n{n} Loops events, one every {SPACING}s; key refused for {restored_at - refused_at:.1f}s: "
          f"{len(refused)} answers 401 ({len(refused) - refused_at_pause} of them after status showed the pause; "
          f"{len(refused) - len(dead_letters)} went back to the queue), "
          f"dead letters {len(dead_letters)} ({dead_at_pause} when the pause showed), "
          f"{during['queued']} queued and {during['retries_waiting']} retries waiting during the pause; "
          f"first delivery {first_after - restored_at:.1f}s after the restore, last {last - restored_at:.1f}s after; "
          f"delivered {len(delivered)}; pause log lines {len(pause_lines)}, Sentry reports {len(reports)}")

    assert len(dead_letters) <= 10, f"{len(dead_letters)} dead letters: the refused key was not paused"
    assert all((d.reason, d.status) == ("rejected", 401) for d in dead_letters)
    assert delivered | dead_ids == set(events), f"missing: {sorted(set(events) - delivered - dead_ids)}"
    assert len(dead()) == len(dead_letters) == len(dead_ids)
    # What the operator saw while it lasted
    assert paused["breaker"] == "auth_failed" and paused["breaker_since"]
    assert paused["credential_env"] == "LOOPS_API_KEY"
    assert shown["breaker"] == "auth_failed" and shown["auth_failed"] is True
    assert "auth_failed since" in table and "Fix LOOPS_API_KEY" in table, table
    assert during["auth_failed"]
    # Only answers from before the pause are dead letters: no event refused after it began (a probe, or one in
    # flight) is one. Same clock: the sandbox stamps each request as it arrives, Redis the pause as it begins.
    since = datetime.fromisoformat(paused["breaker_since"].replace("Z", "+00:00")).timestamp()
    late = {r["idempotency_key"] for r in refused if r["ts"] >= since} & dead_ids
    assert not late, f"refused while the vendor was paused, then dead-lettered: {sorted(late)}"
    # ... and once it was over: resumed by itself
    assert after["breaker"] == "closed" and not after["auth_failed"]
    assert len(pause_lines) == 1 and "ERROR" in pause_lines[0] and "LOOPS_API_KEY" in pause_lines[0], pause_lines
    assert len(reports) == 1 and tags_of(reports[0])["vendor"] == "loops" and tags_of(reports[0])["status"] == "401"
    everything = b"".join(sentry.raw).decode(errors="replace") + logs
    credentials = ("_KEY", "_TOKEN", "_APPKEY", "_APP_ID")
    secrets = [*SANDBOX_CREDENTIALS.values(), *(v for k, v in product_env.items() if k.endswith(credentials))]
    assert not [s[:6] for s in secrets if s and s in everything]
