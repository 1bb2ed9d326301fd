"""The vendor ends with the producer's last word: per-person order at each vendor, merged updates.

Real workers, real Redis, the sandbox over HTTP; assertions are on what each vendor ends up holding
(``/_sandbox/state``: every accepted write applied in arrival order), never on timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import redis

import worker
from tests.conftest import MAILING_LISTS
from tests.helpers import wait_idle
from worker.delivery.ordering import PersonLog
from worker.dev.localstack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VENDORS = ("convertloop", "loops", "conveyour")
VIP = MAILING_LISTS["vip"]


def settled(redis_url: str, timeout: float = 120.0) -> None:
    """Every call of every person delivered or dead-lettered: no call pending in any person's order, no retry
    waiting, no message queued or held (the positive signal before reading the vendors' final state)."""
    client = redis.Redis.from_url(redis_url)

    def done() -> bool:
        pending = sum(PersonLog(client, "vdw", v).pending() for v in VENDORS)
        retries = sum(client.zcard(f"vdw:retries:{v}") for v in VENDORS)
        return pending == 0 and retries == 0

    try:
        wait_until(done, timeout=timeout, interval=0.1, message="every person's calls settled")
        wait_idle(redis_url, timeout=timeout)
    finally:
        client.close()


def the_four_calls(emails: list[str]) -> None:
    """The issue's scenario, people interleaved: identify(old, Acme), track, segment(+vip), identify(new), track,
    segment(-vip), track, in that order for each person."""
    steps = [
        lambda e: worker.identify(email=e, traits={"plan": "old", "company": "Acme"}),
        lambda e: worker.track("step_1", email=e),
        lambda e: worker.segment(email=e, add=["vip"]),
        lambda e: worker.identify(email=e, traits={"plan": "new"}),
        lambda e: worker.track("step_2", email=e),
        lambda e: worker.segment(email=e, remove=["vip"]),
        lambda e: worker.track("step_3", email=e),
    ]
    for step in steps:
        for email in emails:
            step(email)


def wrong_states(sandbox_client, emails: list[str]) -> list[str]:
    """Each person/vendor state that is not what applying the calls in order gives, described."""
    wrong = []
    states = {v: sandbox_client.state(v) for v in VENDORS}
    steps = ["step_1", "step_2", "step_3"]
    for email in emails:
        cl = states["convertloop"].get(email) or {}
        if cl.get("attributes", {}).get("plan") != "new" or cl.get("attributes", {}).get("company") != "Acme" \
                or "vip" in cl.get("segments", []) or [e["name"] for e in cl.get("events", [])] != steps:
            wrong.append(f"convertloop {email}: {cl}")
        lp = states["loops"].get(email) or {}
        if lp.get("properties", {}).get("plan") != "new" or lp.get("properties", {}).get("company") != "Acme" \
                or lp.get("mailing_lists", {}).get(VIP) is not False \
                or [e["eventName"] for e in lp.get("events", [])] != steps:
            wrong.append(f"loops {email}: {lp}")
        cy = states["conveyour"].get(email) or {}
        if cy.get("traits", {}).get("plan") != "new" or cy.get("traits", {}).get("company") != "Acme" \
                or "vip" in cy.get("tags", []) or [e["event"] for e in cy.get("events", [])] != steps:
            wrong.append(f"conveyour {email}: {cy}")
    return wrong


#: The pools a worker runs: the default (32 threads) and the recommended one for slow vendors, whose every task
#: is a greenlet of its own, so many more of one person's calls are in flight in a process at once.
POOLS = {"threads": (), "gevent": ("-P", "gevent", "-c", "64")}


@pytest.mark.parametrize(("processes", "pool"), [(2, "threads"), (4, "threads"), (2, "gevent")],
                         ids=["2-threads", "4-threads", "2-gevent"])
def test_every_person_ends_with_their_last_word(processes, pool, worker_factory, product_env, sandbox_client, store,
                                                unique_email):
    """40 people, seven calls each; every other person's first request at each vendor answers 503 once.
    Each person/vendor state equals the calls applied in order; events arrive in call order."""
    emails = [f"p{i}-{unique_email}" for i in range(40)]
    sandbox_client.configure("*", latency_ms=30, fail_next=[{"status": 503, "match": e} for e in emails[::2]])
    # Product defaults: 32 threads, retries bounded by the 24 h window only (a failing bulk request counts an
    # attempt for every person in it, so the suite's RETRY_MAX_ATTEMPTS=4 could dead-letter a call here).
    workers = [worker_factory(f"order-{pool}-{processes}-{i}", POOLS[pool], WORKER_CONCURRENCY=32,
                              RETRY_MAX_ATTEMPTS=0)
               for i in range(processes)]
    the_four_calls(emails)
    settled(product_env["REDIS_URL"])
    for w in workers:
        w.stop()
    failed = [r for r in sandbox_client.requests(status=503) if unique_email in str(r["body"])]
    requests = {v: len([r for r in sandbox_client.requests(vendor=v) if unique_email in str(r["body"])])
                for v in VENDORS}
    print(f"\n{processes} processes ({pool}): {len(failed)} injected 503s; "
          f"requests per vendor for 280 calls: {requests}")
    assert len(failed) == 3 * 20, "the injected failures were not all answered: the test proves less"
    assert not [d for d in store.list() if unique_email in str(d.event)], "a call was dead-lettered"
    assert wrong_states(sandbox_client, emails) == []


def test_a_failing_person_holds_only_their_own_calls(worker_factory, product_env, sandbox_client, unique_email):
    """One person's first call keeps answering 503 at Loops: their later calls wait for it (none goes out
    without it), while 100 other people are delivered meanwhile; once Loops takes it, the person holds their
    last word."""
    slow, others = f"slow-{unique_email}", [f"o{i}-{unique_email}" for i in range(100)]
    sandbox_client.configure("loops", fail_next=[{"status": 503, "match": slow}] * 1000)
    w = worker_factory("order-hold", BREAKER_THRESHOLD=0, RETRY_MAX_ATTEMPTS=0)
    worker.identify(email=slow, traits={"plan": "old", "company": "Acme"}, vendors=["loops"])
    worker.segment(email=slow, add=["vip"], vendors=["loops"])
    worker.identify(email=slow, traits={"plan": "new"}, vendors=["loops"])
    for email in others:
        worker.identify(email=email, traits={"plan": "other"}, vendors=["loops"])

    def delivered_others() -> set[str]:
        return {r["body"]["email"] for r in sandbox_client.requests(vendor="loops", status=200)
                if r["body"].get("email") in set(others)}

    wait_until(lambda: delivered_others() == set(others), timeout=60, message="the other 100 people delivered")
    wait_until(lambda: len([r for r in sandbox_client.requests(vendor="loops", status=503)
                            if r["body"].get("email") == slow]) >= 2, timeout=60, message="the person retried")
    assert sandbox_client.state("loops", slow) is None, "a call of the failing person reached Loops"
    sandbox_client.configure("loops", fail_next=None)  # Loops takes the person's calls again
    settled(product_env["REDIS_URL"])
    w.stop()
    about = [r for r in sandbox_client.requests(vendor="loops") if r["body"].get("email") == slow]
    statuses = [r["status"] for r in about]
    print(f"\nthe failing person's requests: {statuses}")
    first_ok = statuses.index(200)
    assert all(s == 503 for s in statuses[:first_ok])
    # Every request about the person up to the first accepted one carried the first call (company=Acme): no
    # later call went out on its own ahead of it.
    assert all(r["body"].get("company") == "Acme" for r in about[:first_ok + 1])
    state = sandbox_client.state("loops", slow)
    assert state["properties"]["plan"] == "new" and state["properties"]["company"] == "Acme"
    assert state["mailing_lists"] == {VIP: True}


@pytest.mark.parametrize("queued_first", [False, True], ids=["worker-first", "calls-queued-first"])
def test_a_dead_letter_releases_the_person_and_replay_is_an_update_at_that_time(worker_factory, product_env,
                                                                                sandbox_client, store,
                                                                                unique_email, queued_first):
    """The first call is refused (422): it is dead-lettered and the calls behind it go on. Replaying it later
    sends it as an update at that time: its traits land over the later call's.

    With both calls queued before the worker starts, the refused call's own message takes the person's turn
    (its take claims it): its dead letter must be recorded with the turn's end, or the next call's message
    finds it still pending and sends it again, merged with its own."""
    email = unique_email
    # Twice: a merged request holding the call is refused, then the call alone, which is dead-lettered.
    sandbox_client.configure("loops", fail_next=[{"status": 422, "match": "Acme"}] * 2)
    w = None if queued_first else worker_factory("order-dead")
    bad = worker.identify(email=email, traits={"plan": "old", "company": "Acme"}, vendors=["loops"])
    worker.identify(email=email, traits={"plan": "new"}, vendors=["loops"])
    if w is None:
        w = worker_factory("order-dead")
    settled(product_env["REDIS_URL"])
    (dead,) = store.find(bad)
    assert dead.reason == "rejected"
    state = sandbox_client.state("loops", email)
    assert state["properties"] == {"plan": "new"}, state
    sandbox_client.configure("loops", fail_next=None)
    subprocess.run([sys.executable, "-m", "worker", "deadletters", "replay", dead.id], check=True,
                   env={**os.environ}, capture_output=True)
    settled(product_env["REDIS_URL"])
    w.stop()
    state = sandbox_client.state("loops", email)
    assert state["properties"] == {"plan": "old", "company": "Acme"}, state


def test_a_worker_killed_holding_turns_delays_people_but_keeps_their_order(worker_factory, product_env,
                                                                           sandbox_client, unique_email):
    """A worker SIGKILLed while it holds people's turns (requests on the wire): a new worker takes the turns once
    their lease (the visibility timeout) runs out, and every person still ends with their last word."""
    emails = [f"k{i}-{unique_email}" for i in range(20)]
    sandbox_client.configure("*", latency_ms=1500)
    doomed = worker_factory("order-doomed", BROKER_VISIBILITY_TIMEOUT=6, WORKER_CONCURRENCY=32)
    the_four_calls(emails)

    def on_the_wire() -> int:
        return sum(1 for r in sandbox_client.requests() if r["status"] is None and unique_email in str(r["body"]))

    wait_until(lambda: on_the_wire() >= 10, timeout=30, interval=0.02, message="requests in flight")
    os.killpg(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait(10)
    sandbox_client.configure("*", latency_ms=0)
    worker_factory("order-rescuer", BROKER_VISIBILITY_TIMEOUT=6)
    settled(product_env["REDIS_URL"], timeout=180)
    assert wrong_states(sandbox_client, emails) == []
