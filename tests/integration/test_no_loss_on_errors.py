"""Nothing acknowledged without a record: whatever raises while a delivery runs, it is delivered or dead-lettered.

Faults are injected into real worker processes: a ``sitecustomize`` module on the worker's PYTHONPATH wraps
one product function so that its first calls raise (a Redis error, or a bug in a vendor module), as
``VDW_TEST_FAULT=<target>:<count>`` says. Every event is then counted at the sandbox and in the dead-letter
store: each is delivered or dead-lettered, none missing.
"""

from __future__ import annotations

import json
import textwrap

import pytest

import worker
from tests.helpers import wait_idle
from worker.dev.localstack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITECUSTOMIZE = textwrap.dedent('''
    """Test-only fault injection for worker processes (tests/integration/test_no_loss_on_errors.py)."""
    import importlib
    import os
    import threading

    TARGETS = {
        "limiter": ("worker.limits.throttle", "Throttle", "wait", "redis.exceptions:ConnectionError"),
        "breaker": ("worker.retries.breaker", "Breaker", "is_open", "redis.exceptions:TimeoutError"),
        "schedule": ("worker.retries.schedule", "RetrySchedule", "add", "redis.exceptions:OutOfMemoryError"),
        "deadletters": ("worker.delivery.deadletters", "DeadLetterStore", "add", "redis.exceptions:OutOfMemoryError"),
        # The turn's end made with the message's acknowledgement (on the threads pool, a loop turn's together).
        "order": ("worker.scripts", None, "run_together", "redis.exceptions:ConnectionError"),
        "vendor": ("worker.vendors.loops", "Loops", "build", "builtins:KeyError"),
    }
    spec = os.environ.get("VDW_TEST_FAULT")
    if spec:
        target, count = spec.split(":")
        module, cls, name, error = TARGETS[target]
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        err_module, err_name = error.split(":")
        exc = getattr(importlib.import_module(err_module), err_name)
        original = getattr(owner, name)
        left = [int(count)]
        lock = threading.Lock()

        def faulty(*args, **kwargs):
            with lock:
                fire = left[0] > 0
                left[0] -= 1
            if fire:
                raise exc(f"injected fault in {cls or module}.{name}")
            return original(*args, **kwargs)

        setattr(owner, name, faulty)
''')


@pytest.fixture(scope="module")
def fault_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults")
    (path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return str(path)


@pytest.mark.parametrize(("target", "count", "failure"), [
    ("limiter", 3, None),
    ("breaker", 3, None),
    ("order", 3, None),
    ("vendor", 2, None),
    ("schedule", 2, 503),       # the vendor fails once; writing its retry fails twice
    ("deadletters", 2, 422),    # the vendor refuses once; storing the dead letter fails: retried (then delivered)
])
def test_an_unexpected_error_loses_nothing(target, count, failure, worker_factory, fault_path, product_env,
                                           sandbox_client, store, unique_email):
    emails = [f"{target}{i}-{unique_email}" for i in range(6)]
    if failure is not None:
        sandbox_client.configure("loops", fail_next=[{"status": failure, "match": emails[0]}])
    w = worker_factory(f"fault-{target}", ("-Q", "loops"), PYTHONPATH=fault_path, VDW_TEST_FAULT=f"{target}:{count}",
                       BROKER_VISIBILITY_TIMEOUT=4, WORKER_CONCURRENCY=4)
    ids = {worker.track("signed_up", email=e, vendors=["loops"]): e for e in emails}

    def settled() -> tuple[set[str], set[str]]:
        delivered = {r["idempotency_key"] for r in sandbox_client.requests(vendor="loops")
                     if r["status"] in (200, 409) and r["idempotency_key"] in ids}
        dead = {d.event_id for d in store.list("loops") if d.event_id in ids}
        return delivered, dead

    try:
        wait_until(lambda: set().union(*settled()) == set(ids), timeout=90, interval=0.2,
                   message=f"every event delivered or dead-lettered with a fault in {target}")
        # While the worker runs: a message whose acknowledgement failed is held, put back and delivered again
        # (a 409) after its event reached the vendor; stopped before that, it would stay held with no worker.
        wait_idle(product_env["REDIS_URL"], timeout=60, queues=("loops",))
    finally:
        log = w.log()
        w.stop()
    delivered, dead = settled()
    print(f"\n{target}: delivered {len(delivered)}, dead-lettered {len(dead)} of {len(ids)}")
    assert "injected fault" in log, "the fault never fired: the test proves nothing"
    assert delivered | dead == set(ids)


def test_a_segment_this_worker_cannot_carry_is_a_dead_letter_naming_the_setting(worker_factory, product_env,
                                                                                sandbox_client, store,
                                                                                unique_email, monkeypatch):
    """A rolling deploy: the producer maps the segment 'gold' to a Loops list, the worker does not. The Loops
    delivery becomes a 'configuration' dead letter that names LOOPS_MAILING_LISTS, and replays once fixed."""
    lists = json.dumps({**json.loads(product_env["LOOPS_MAILING_LISTS"]), "gold": "list_gold"})
    monkeypatch.setenv("LOOPS_MAILING_LISTS", lists)  # the producer's settings, not the worker's
    from worker.settings import get_settings

    get_settings.cache_clear()
    w = worker_factory("drift", ("-Q", "loops"))
    event_id = worker.segment(email=unique_email, add=["gold"], vendors=["loops"])
    wait_until(lambda: store.find(event_id), timeout=30, message="the dead letter")
    (dead,) = store.find(event_id)
    w.stop()
    assert dead.reason == "configuration" and "LOOPS_MAILING_LISTS" in dead.error and dead.replayable
    assert not [r for r in sandbox_client.requests(vendor="loops") if r["body"].get("email") == unique_email]
    fixed = worker_factory("drift-fixed", ("-Q", "loops"), LOOPS_MAILING_LISTS=lists)
    from worker.ops.cli import main

    assert main(["deadletters", "replay", dead.id]) == 0
    wait_until(lambda: sandbox_client.state("loops", unique_email), timeout=30, message="the replayed delivery")
    fixed.stop()
    assert sandbox_client.state("loops", unique_email)["mailing_lists"] == {"list_gold": True}
