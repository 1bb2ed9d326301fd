"""A worker killed mid-delivery loses nothing: late acks + visibility timeout hand its messages on."""

from __future__ import annotations

import os
import signal
from collections import Counter

import pytest
import redis

import worker
from tests.helpers import email_of as _email
from tests.helpers import locate, wait_idle
from worker.dev.localstack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sigkill_mid_delivery_loses_nothing(start_worker, product_env, sandbox_client, unique_email):
    n = 40
    # The doomed worker holds many messages it has not sent yet (waiting for Loops tokens at 2/s)
    # and some whose requests are on the wire (ConvertLoop answering after 300 ms).
    sandbox_client.configure("convertloop", latency_ms=300)
    first = start_worker("doomed", BROKER_VISIBILITY_TIMEOUT=4, LOOPS_RATE_LIMIT=2)
    ids = [worker.track("sale", email=f"{i}-{unique_email}", vendors=["loops", "convertloop"]) for i in range(n)]

    def mine(vendor, status=None):
        return [r for r in sandbox_client.requests(vendor=vendor, status=status) if unique_email in str(r["body"])]

    def emails(vendor):
        key = (lambda b: b["email"]) if vendor == "loops" else (lambda b: b["person"]["email"])
        return {key(r["body"]) for r in mine(vendor) if r["status"] in (200, 409)}

    wait_until(lambda: len(mine("loops")) >= 3, timeout=20, message="deliveries under way")
    unacked = redis.Redis.from_url(product_env["REDIS_URL"]).hlen("unacked")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    at_kill = {v: len(emails(v)) for v in ("loops", "convertloop")}
    assert unacked > 0 and at_kill["loops"] < n, "nothing was held by the worker; the test proves nothing"

    start_worker("rescuer", BROKER_VISIBILITY_TIMEOUT=4, LOOPS_RATE_LIMIT=0)
    sandbox_client.configure("convertloop", latency_ms=0)
    everyone = {f"{i}-{unique_email}" for i in range(n)}
    for vendor in ("loops", "convertloop"):
        wait_until(lambda v=vendor: emails(v) == everyone, timeout=60, message=f"every event at {vendor}")
    loops_keys = Counter(r["idempotency_key"] for r in mine("loops", 200))
    extra = {v: len(mine(v)) - n for v in ("loops", "convertloop")}
    print(f"\nkilled holding {unacked} unacked messages, delivered then: {at_kill}; "
          f"requests beyond one per event: {extra}; Loops 409s: {len(mine('loops', 409))}")
    assert set(loops_keys) == set(ids)
    assert max(loops_keys.values()) == 1, "Loops accepted an event twice"


@pytest.mark.timeout(600)  # its own waits add up to about 450 s
def test_sigkill_every_worker_with_requests_in_flight_loses_nothing(start_worker, product_env, sandbox_client,
                                                                    unique_email):
    """200 track events to all three vendors, each vendor answering after 300 ms; both worker processes are
    SIGKILLed while requests are on the wire; a new worker finishes the job. Every event reaches every vendor;
    Loops never accepts one twice (its Idempotency-Key: a repeat is answered 409)."""
    n, vendors = 200, ("convertloop", "loops", "conveyour")
    sandbox_client.configure("*", latency_ms=300)
    doomed = [start_worker(f"doomed-{i}", BROKER_VISIBILITY_TIMEOUT=5, WORKER_CONCURRENCY=8) for i in range(2)]
    tag = unique_email
    ids = {worker.track("sale", email=f"{i}-{tag}", properties={"i": i}): f"{i}-{tag}" for i in range(n)}
    everyone = set(ids.values())

    def mine(vendor: str) -> list[dict]:
        return [r for r in sandbox_client.requests(vendor=vendor) if tag in str(r["body"])]

    def accepted(vendor: str) -> Counter:
        """Email -> how many times the vendor accepted it (a Loops 409 is a refused repeat, not an acceptance)."""
        return Counter(_email(vendor, r["body"]) for r in mine(vendor) if r["status"] == 200)

    def in_flight() -> int:
        return sum(1 for v in vendors for r in mine(v) if r["status"] is None)

    # Kill while at least a dozen requests are on the wire and some deliveries are done.
    wait_until(lambda: in_flight() >= 12 and sum(len(accepted(v)) for v in vendors) >= 30, timeout=30,
               interval=0.02, message="deliveries in flight")
    held = redis.Redis.from_url(product_env["REDIS_URL"]).hlen("unacked")
    for w in doomed:
        os.killpg(w.proc.pid, signal.SIGKILL)
    for w in doomed:
        w.proc.wait(10)
    on_the_wire = in_flight()
    at_kill = {v: len(accepted(v)) for v in vendors}
    assert held > 0 and on_the_wire > 0, "nothing was in flight; the test proves nothing"
    assert all(count < n for count in at_kill.values()), f"all delivered before the kill: {at_kill}"

    start_worker("rescuer", BROKER_VISIBILITY_TIMEOUT=5)
    for vendor in vendors:
        try:
            wait_until(lambda v=vendor: set(accepted(v)) >= everyone, timeout=90, interval=0.2,
                       message=f"every event at {vendor}")
        except AssertionError as exc:
            missing = everyone - set(accepted(vendor))
            raise AssertionError(f"{exc}; {len(missing)} missing, in Redis: "
                                 f"{locate(product_env['REDIS_URL'], missing)}") from None
    wait_idle(product_env["REDIS_URL"], timeout=60)  # every restored message ran and was acked: no redelivery left

    duplicates = {v: sum(c - 1 for c in accepted(v).values()) for v in vendors}
    loops_409 = sum(1 for r in mine("loops") if r["status"] == 409)
    attempts = {v: len(mine(v)) for v in vendors}
    print(f"\nSIGKILL with {held} unacked messages, {on_the_wire} requests on the wire; delivered at the kill: "
          f"{at_kill}\nrequests per vendor for {n} events: {attempts}\n"
          f"duplicates accepted per vendor: {duplicates}; Loops repeats refused with 409: {loops_409}")
    for vendor in vendors:
        assert set(accepted(vendor)) == everyone
    assert duplicates["loops"] == 0, "Loops accepted the same Idempotency-Key twice"
    keys = Counter(r["idempotency_key"] for r in mine("loops") if r["status"] == 200)
    assert set(keys) == set(ids) and max(keys.values()) == 1

