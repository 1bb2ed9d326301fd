"""Redis restarts under a running worker: the worker reconnects and carries on, nothing queued is lost,
and the rate limit still holds afterwards.

This module has its own ``redis-server`` (AOF on, like docker/compose.yaml) on a fixed port, so it can be
restarted on the same address without touching the session's Redis.
"""

from __future__ import annotations

import time

import pytest
import redis

import worker
from tests.helpers import max_in_window
from worker import clients
from worker.delivery.deadletters import DeadLetterStore
from worker.delivery.pipeline import Pipeline
from worker.dev.localstack import RedisServer, wait_until
from worker.producer.publisher import Publisher
from worker.settings import get_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE = 5
N = 20  # events before the restart, and again after it


@pytest.fixture
def restartable_redis(product_env, monkeypatch, leak_watch):
    """A private AOF-persisted Redis on a fixed port; this process's producer points at it."""
    server = RedisServer(persist=True).start()
    redis.Redis.from_url(server.url).config_set("appendfsync", "always")
    monkeypatch.setenv("REDIS_URL", server.url)
    for refresh in (get_settings.cache_clear, clients.reset, Pipeline.reset_default, Publisher.reset_default):
        refresh()
    yield server
    try:
        leak_watch.add_redis(server.url, "restarted redis")
    finally:
        server.stop()


@pytest.mark.timeout(600)  # its own waits add up to about 300 s
def test_worker_carries_on_after_redis_restart_and_the_limit_holds(restartable_redis, start_worker, sandbox_client,
                                                                   unique_email):
    # start_worker after restartable_redis: the worker is stopped before its Redis is.
    server = restartable_redis
    w = start_worker("restart-w", REDIS_URL=server.url, LOOPS_RATE_LIMIT=RATE, BROKER_VISIBILITY_TIMEOUT=20)
    sandbox_client.configure("loops", rate_limit=RATE)

    def mine(vendor: str, phase: str, status: int | None = 200) -> list[dict]:
        return [r for r in sandbox_client.requests(vendor=vendor)
                if f"{phase}-" in str(r["body"]) and unique_email in str(r["body"])
                and (status is None or r["status"] == status)]

    def emails(vendor: str, phase: str) -> set[str]:
        return {r["body"]["email"] for r in mine(vendor, phase)}

    for i in range(N):
        worker.identify(email=f"before-{i}-{unique_email}", vendors=["loops", "convertloop"])
    wait_until(lambda: len(mine("loops", "before")) >= 3, timeout=20, message="deliveries before the restart")

    client = redis.Redis.from_url(server.url)
    backlog = client.llen("loops") + client.hlen("unacked")
    client.close()
    server.stop(keep_data=True)
    down_at = time.time()
    time.sleep(2)
    server.start()
    up_at = time.time()
    at_restart = len(emails("loops", "before"))
    assert backlog > 0 and at_restart < N, "the restart found nothing queued; the test proves nothing"

    # The producer's pooled connection died with the old Redis; new calls still go through.
    for i in range(N):
        worker.identify(email=f"after-{i}-{unique_email}", vendors=["loops", "convertloop"])

    for phase in ("before", "after"):
        for vendor in ("loops", "convertloop"):
            wait_until(lambda v=vendor, p=phase: emails(v, p) == {f"{p}-{i}-{unique_email}" for i in range(N)},
                       timeout=60, interval=0.2, message=f"every {phase}-restart event at {vendor}")
    assert w.proc.poll() is None, "the worker died with Redis"

    after = sorted(r["ts"] for r in sandbox_client.requests(vendor="loops")
                   if r["ts"] > up_at and unique_email in str(r["body"]))
    rejected = [r for r in sandbox_client.requests(vendor="loops") if r["status"] == 429]
    span = after[-1] - after[0]
    rate = (len(after) - 1) / span if span else float("inf")
    dead = [d for d in DeadLetterStore.default().list() if unique_email in str(d.event)]
    print(f"\nrestart with {backlog} loops messages queued or held ({at_restart}/{N} delivered), Redis down "
          f"{up_at - down_at:.1f}s; after it: {len(after)} Loops requests at {rate:.2f}/s (limit {RATE}/s), "
          f"max {max_in_window(after)} in any 1s window, {len(rejected)} answered 429; dead letters: {len(dead)}")
    assert not rejected, "the sandbox saw the Loops limit exceeded"
    assert len(after) >= N
    assert max_in_window(after) <= RATE + 1  # the limit holds (the average rate is printed, not asserted)
    assert not dead
    assert "Connection to broker lost" in w.log() or "Cannot connect to" in w.log() or "reconnect" in w.log().lower()
