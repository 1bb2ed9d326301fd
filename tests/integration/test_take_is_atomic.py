"""The narrowest crash window: a worker dies between Redis running its take and the worker reading the answer.

Its own worker consumes only ``loops`` (``start_worker``: stopped when the test ends).
"""

from __future__ import annotations

import os
import signal

import pytest
import redis

import worker
from tests.helpers import UNACKED, locate, wait_idle
from worker.dev.localstack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Attempts at catching the worker's take on its way to Redis. One fails only if the worker's event loop wrote
#: something else first (a timer's heartbeat) and waits for that write: then the worker is let go, delivers the
#: attempt's event, and is caught again with a new one.
ATTEMPTS = 5
#: Seconds to wait for the take to reach Redis in one attempt (it takes milliseconds) before letting go.
CATCH = 5.0


@pytest.mark.timeout(900)  # its own waits: up to 5 attempts of 95 s, then about 150 s
def test_message_taken_by_a_frozen_worker_is_not_lost(start_worker, product_env, sandbox_client, unique_email):
    """Stock kombu pops with BRPOP and records the message as held in a second command, so a worker that dies
    between the two takes the message with it. Here the worker takes a message off its queue with one script
    (EVAL) that also records it as held.

    The window is made certain, and each step is seen in Redis (CLIENT LIST): the idle worker is frozen
    (SIGSTOP) while it waits on its queue (BLMOVE); the event is published; every write is held
    (``CLIENT PAUSE WRITE``) and the worker runs until its take (EVAL) has reached Redis and waits there; the
    worker is frozen again and the writes are let go: Redis runs the take and answers the frozen worker, which
    never reads the answer — it is SIGKILLed. The message is then off its queue and recorded as held (in one
    step), and a new worker delivers it."""
    client = redis.Redis.from_url(product_env["REDIS_URL"], decode_responses=True)
    doomed = start_worker("frozen", ("-Q", "loops"), BROKER_VISIBILITY_TIMEOUT=5)
    group = doomed.proc.pid

    def conn(cid: str) -> dict:
        """The connection's CLIENT LIST entry ({} once it is gone)."""
        return next((c for c in client.client_list() if c["id"] == cid), {})

    def blocked_in(cid: str, command: str) -> bool:
        """Is connection ``cid``'s last command ``command``, still waiting for Redis (blocked or held)?"""
        c = conn(cid)
        return c.get("cmd") == command and "b" in c.get("flags", "")

    def waiting_on_queue() -> list[str]:
        """The connections blocked in BLMOVE: the idle worker's, waiting for its queue to fill."""
        return [c["id"] for c in client.client_list() if "b" in c["flags"] and c["cmd"] == "blmove"]

    def freeze_while_waiting() -> str:
        """SIGSTOP the worker while its connection is blocked in BLMOVE; that connection's id."""
        for _ in range(20):
            (cid,) = wait_until(waiting_on_queue, timeout=30, message="the idle worker waiting on its queue")
            os.killpg(group, signal.SIGSTOP)
            if blocked_in(cid, "blmove"):
                return cid
            os.killpg(group, signal.SIGCONT)  # its BLMOVE had just timed out: again
        raise AssertionError("the worker was never frozen while waiting on its queue")

    def catch_take(cid: str) -> bool:
        """With every write held, let the frozen worker run until its take (EVAL) waits in Redis, freeze it
        again, let the writes go. False (the worker running, the writes let go) if the take never came."""
        client.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")  # reads (CLIENT LIST) are still answered
        try:
            os.killpg(group, signal.SIGCONT)
            try:
                wait_until(lambda: blocked_in(cid, "eval"), timeout=CATCH, interval=0.01,
                           message="the worker's take (EVAL) held in Redis")
            except AssertionError:
                return False
            os.killpg(group, signal.SIGSTOP)
            return True
        finally:
            client.execute_command("CLIENT", "UNPAUSE")

    def delivered(email: str) -> list[dict]:
        return [r for r in sandbox_client.requests(vendor="loops", status=200) if r["body"]["email"] == email]

    taken = email = take_conn = None
    for attempt in range(ATTEMPTS):
        take_conn = freeze_while_waiting()
        # Published while the worker is frozen: Redis answers its BLMOVE (which leaves the message on the
        # queue), or the BLMOVE had just timed out; either way its next command on that connection is the take.
        email = f"{attempt}-{unique_email}"
        event_id = worker.track("frozen", email=email, vendors=["loops"])
        if catch_take(take_conn):
            taken = event_id
            break
        wait_until(lambda e=email: delivered(e), timeout=30, message="the event of an attempt that was let go")
        wait_idle(product_env["REDIS_URL"])
    assert taken is not None and take_conn is not None, \
        f"the worker's take was never caught on its way to Redis in {ATTEMPTS} attempts"

    # The positive signal: Redis ran the frozen worker's take (its connection's last command) and answered it.
    wait_until(lambda: conn(take_conn).get("cmd") == "eval" and "b" not in conn(take_conn).get("flags", "b"),
               timeout=30, message="Redis to run the frozen worker's take")
    assert locate(product_env["REDIS_URL"], {taken}) == {UNACKED: [taken]}, \
        "the take did not move the message from its queue to the held messages in one step"
    os.killpg(group, signal.SIGKILL)
    doomed.proc.wait(10)
    where = locate(product_env["REDIS_URL"], {taken})
    assert where == {UNACKED: [taken]}, f"the message left Redis with the frozen worker: {where}"

    start_worker("rescuer", ("-Q", "loops"), BROKER_VISIBILITY_TIMEOUT=5)
    wait_until(lambda: delivered(email), timeout=60, message="the event at loops")
    print(f"\ncaught the take at attempt {attempt + 1}; the message was held, not lost, and delivered")
    client.close()
