"""The circuit breaker on the test Redis: opens after a run of failures, one probe at a time with growing
spacing, closes on an answer, and costs no Redis call for a healthy delivery."""

from __future__ import annotations

import redis

from worker.retries.breaker import CLOSED, Breaker


def evalsha_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_opens_after_threshold_failures_in_a_row_and_every_process_sees_it(client, prefix, redis_server):
    b = Breaker(client, prefix, threshold=3)
    other = Breaker(redis.Redis.from_url(redis_server.url), prefix, threshold=3)
    for _ in range(2):
        b.record("loops", ok=False)
    assert not b.is_open("loops") and other.poll("loops").state == CLOSED
    b.record("loops", ok=False)
    assert b.is_open("loops")
    assert not other.is_open("loops")  # its view is local until it polls
    state = other.poll("loops")
    assert state.open and state.failures == 3 and state.since is not None and other.is_open("loops")
    assert other.poll("convertloop").state == CLOSED


def test_a_success_ends_the_run(client, prefix):
    b = Breaker(client, prefix, threshold=3)
    for _ in range(2):
        b.record("loops", ok=False)
    b.record("loops", ok=True)
    for _ in range(2):
        b.record("loops", ok=False)
    assert b.poll("loops").state == CLOSED


def test_a_healthy_success_writes_nothing(client, prefix):
    b = Breaker(client, prefix, threshold=3)
    before = evalsha_calls(client)
    for _ in range(50):
        assert b.record("loops", ok=True) is False
    assert evalsha_calls(client) == before
    b.record("loops", ok=False)
    b.record("loops", ok=True)  # after a failure: one write to end the run
    assert evalsha_calls(client) == before + 2


def test_one_probe_at_a_time_with_growing_spacing_then_closed(client, prefix):
    b = Breaker(client, prefix, threshold=1, max_probe=4, first_probe=0)
    b.record("loops", ok=False)
    assert b.poll("loops").probe_due
    assert b.claim_probe("loops", lease=30, holder="a")
    assert not b.claim_probe("loops", lease=30, holder="b")  # one at a time
    assert not b.poll("loops").probe_due
    spacings = []
    for _ in range(5):
        b.probe_done("loops", failed=True)
        spacings.append(float(client.hget(f"{prefix}:breaker:loops", "spacing")))
    assert spacings == [1.0, 2.0, 4.0, 4.0, 4.0]  # doubling from at least 1 s, up to max_probe
    state = b.poll("loops")
    assert state.open and not state.probe_due and not b.claim_probe("loops", lease=30, holder="a")
    assert b.record("loops", ok=True) is True  # an answer closes it, once
    assert b.poll("loops").state == CLOSED and b.record("loops", ok=True) is False
    assert not b.claim_probe("loops", lease=30, holder="a")


def test_threshold_zero_turns_it_off(client, prefix):
    b = Breaker(client, prefix, threshold=0)
    before = evalsha_calls(client)
    for _ in range(20):
        b.record("loops", ok=False)
    assert not b.is_open("loops") and evalsha_calls(client) == before
    assert b.poll("loops").state == CLOSED and not b.poll("loops").open  # every process sees it closed
