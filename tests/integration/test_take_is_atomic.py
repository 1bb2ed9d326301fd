"""The narrowest crash window: a worker dies between Redis handing it a message and recording that it holds it.

In its own module, so that no other worker is running (the module's workers live until it ends).
"""

from __future__ import annotations

import os
import signal

import pytest
import redis

import worker
from tests.helpers import locate
from worker.localstack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_message_popped_by_a_frozen_worker_is_not_lost(worker_factory, product_env, sandbox_client, unique_email):
    """The narrowest window: Redis hands a waiting worker a message, and the worker dies before it could record
    that it holds it. Stock kombu pops with BRPOP, so the message then exists nowhere; here the worker only
    takes a message off its queue in the same atomic step that records it as held.

    The window is made wide and certain: the idle worker is frozen (SIGSTOP) while it waits on Redis, the event
    is published, Redis answers the frozen worker, and the worker is SIGKILLed without ever running again."""
    client = redis.Redis.from_url(product_env["REDIS_URL"])
    doomed = worker_factory("frozen", BROKER_VISIBILITY_TIMEOUT=5)

    def blocked() -> int:
        return sum(1 for c in client.client_list() if "b" in c["flags"])

    wait_until(lambda: blocked() >= 1, timeout=30, message="the idle worker waiting on its queues")
    os.killpg(doomed.proc.pid, signal.SIGSTOP)
    event_id = worker.track("frozen", email=unique_email, vendors=["loops"])
    # Redis has answered every waiting worker (the frozen one cannot read the answer): the positive signal.
    wait_until(lambda: blocked() == 0, timeout=30, message="Redis to answer the frozen worker")
    os.killpg(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait(10)
    where = locate(product_env["REDIS_URL"], {event_id})
    assert "nowhere" not in where, f"the message left Redis with the frozen worker: {where}"

    worker_factory("rescuer", BROKER_VISIBILITY_TIMEOUT=5)
    wait_until(lambda: [r for r in sandbox_client.requests(vendor="loops", status=200)
                        if r["body"]["email"] == unique_email],
               timeout=60, message="the event at loops")
    client.close()
