"""The circuit breaker on the test Redis: opens after a run of failures, one probe at a time with growing
spacing, closes on an answer, and costs no Redis call for a healthy delivery."""

from __future__ import annotations

import redis

from worker.retries.breaker import AUTH_FAILED, CLOSED, OPEN, Breaker


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


# -- the pause for refused credentials (state auth_failed) ---------------------


def test_a_run_of_auth_refusals_pauses_the_vendor_once_and_every_process_sees_it(client, prefix, redis_server):
    b = Breaker(client, prefix, threshold=10, auth_threshold=3, auth_interval=30)
    other = Breaker(redis.Redis.from_url(redis_server.url), prefix, threshold=10, auth_threshold=3)
    first, second = b.record_auth_failure("loops"), other.record_auth_failure("loops")  # any worker's count
    assert (first.paused, first.in_a_row, second.paused, second.in_a_row) == (False, 1, False, 2)
    assert not b.is_open("loops") and b.poll("loops").state == CLOSED
    third = b.record_auth_failure("loops")
    assert third.paused and third.paused_now and third.in_a_row == 3
    assert b.is_open("loops")
    later = [other.record_auth_failure("loops") for _ in range(5)]  # in flight when it paused: all go back
    assert all(r.paused and not r.paused_now for r in later), "only one answer per pause says it paused"
    state = other.poll("loops")
    assert state.state == AUTH_FAILED and state.open and state.auth_failed and state.auth_failures == 8
    assert state.since is not None and not state.probe_due  # the first probe comes after auth_interval
    assert other.is_open("loops") and b.poll("convertloop").state == CLOSED


def test_an_accepted_answer_ends_the_run_but_retryable_failures_do_not(client, prefix):
    b = Breaker(client, prefix, threshold=10, auth_threshold=3)
    b.record_auth_failure("loops")
    b.record_auth_failure("loops")
    b.record("loops", ok=False)  # a 503 says nothing about the key: neither counts nor ends the run
    assert b.poll("loops").auth_failures == 2
    assert b.record("loops", ok=True) is False  # an answer: the run is over (and nothing was open to close)
    assert b.poll("loops").auth_failures == 0
    assert not b.record_auth_failure("loops").paused and not b.record_auth_failure("loops").paused
    assert b.record_auth_failure("loops").paused_now


def test_a_refusal_ends_a_run_of_retryable_failures(client, prefix):
    b = Breaker(client, prefix, threshold=3, auth_threshold=5)
    b.record("loops", ok=False)
    b.record("loops", ok=False)
    b.record_auth_failure("loops")  # the vendor answered
    b.record("loops", ok=False)
    assert b.poll("loops").state == CLOSED and b.poll("loops").failures == 1


def test_paused_it_is_probed_at_a_fixed_spacing_and_an_accepted_probe_resumes_it(client, prefix):
    b = Breaker(client, prefix, threshold=2, max_probe=4, auth_threshold=1, auth_interval=7)
    assert b.record_auth_failure("loops").paused_now
    key = f"{prefix}:breaker:loops"
    client.hset(key, "next_probe", 0)  # due now
    assert b.poll("loops").probe_due
    assert b.claim_probe("loops", lease=30, holder="a")
    assert not b.claim_probe("loops", lease=30, holder="b")  # one at a time
    spacings = []
    for _ in range(3):
        b.probe_done("loops", failed=True)  # still refused: no doubling, no cap of max_probe
        spacings.append(float(client.hget(key, "spacing")))
    assert spacings == [7.0, 7.0, 7.0]
    state = b.poll("loops")
    assert state.auth_failed and not state.probe_due
    b.record("loops", ok=False)
    b.record("loops", ok=False)  # retryable failures while paused never turn it into an open breaker
    assert b.poll("loops").state == AUTH_FAILED
    assert b.record("loops", ok=True) is True  # accepted: the pause ends, once
    state = b.poll("loops")
    assert state.state == CLOSED and state.auth_failures == 0 and not b.is_open("loops")
    assert b.record("loops", ok=True) is False and not b.claim_probe("loops", lease=30, holder="a")


def test_an_open_breaker_becomes_a_pause_when_the_probes_are_refused(client, prefix):
    b = Breaker(client, prefix, threshold=1, auth_threshold=2, auth_interval=30)
    b.record("loops", ok=False)
    assert b.poll("loops").state == OPEN
    assert not b.record_auth_failure("loops").paused  # the first refusal: still the open breaker
    assert b.poll("loops").state == OPEN
    assert b.record_auth_failure("loops").paused_now
    assert b.poll("loops").state == AUTH_FAILED


def test_auth_threshold_zero_turns_the_pause_off(client, prefix):
    b = Breaker(client, prefix, threshold=3)
    assert not b.auth_enabled and b.enabled
    off = Breaker(client, prefix, threshold=0, auth_threshold=0)
    assert not off.enabled
    only_auth = Breaker(client, prefix, threshold=0, auth_threshold=1)
    assert only_auth.enabled and only_auth.record("loops", ok=False) is False
    assert only_auth.record_auth_failure("loops").paused_now
    assert only_auth.record("loops", ok=True) is True
