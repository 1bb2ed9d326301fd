"""The Redis token bucket (real Redis) and the per-process throttle."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from worker.ratelimit import TokenBucket, Unlimited, limiter_for
from worker.throttle import Throttle, Throttled


@pytest.fixture
def client(redis_server):
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


@pytest.fixture
def key(request):
    return f"test:ratelimit:{request.node.name}"


def test_first_token_is_free_then_spacing_is_enforced(client, key):
    bucket = TokenBucket(client, key, rate=10)
    assert bucket.acquire().granted
    refused = bucket.acquire(max_wait=0)
    assert not refused.granted
    assert 0.05 < refused.wait <= 0.1
    reserved = bucket.acquire(max_wait=1)
    assert reserved.granted and 0.05 < reserved.wait <= 0.1
    again = bucket.acquire(max_wait=1)
    assert again.granted and 0.15 < again.wait <= 0.2


def test_reservations_never_exceed_the_rate(client, key):
    bucket = TokenBucket(client, key, rate=20)
    # A wait is relative to Redis's clock during the call: the send time lies between
    # (before the call + wait) and (after the call + wait). A gap is too short only if even
    # the latest possible next send is closer than 1/rate to the earliest possible previous one.
    early, late = [], []
    for _ in range(40):
        before = time.monotonic()
        r = bucket.acquire(max_wait=5)
        after = time.monotonic()
        assert r.granted
        early.append(before + r.wait)
        late.append(after + r.wait)
    widest_gaps = [late[i + 1] - early[i] for i in range(39)]
    assert min(widest_gaps) >= 0.049
    assert late[-1] - early[0] >= 39 / 20 - 0.01
    assert late[-1] - early[0] < 39 / 20 + 0.5, "the bucket made callers wait far longer than the rate needs"


def test_shared_across_clients_and_threads(client, key, redis_server):
    """Eight threads with their own connections share one bucket: the rate holds for all."""
    granted: list[float] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def run():
        own = TokenBucket(redis.Redis.from_url(redis_server.url), key, rate=50)
        while time.monotonic() - t0 < 1.0:
            r = own.acquire(max_wait=0)
            if r.granted:
                with lock:
                    granted.append(time.monotonic())
            else:
                time.sleep(r.wait)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 40 <= len(granted) <= 52


def test_penalize_blocks_everyone_until_retry_after(client, key):
    bucket = TokenBucket(client, key, rate=100)
    bucket.penalize(1.5)
    r = bucket.acquire(max_wait=0)
    assert not r.granted and 1.4 < r.wait <= 1.5


def test_state_expires(client, key):
    TokenBucket(client, key, rate=10).acquire()
    ttl = client.pttl(key)
    assert 0 < ttl <= 1200


def test_zero_rate_is_unlimited(client, key):
    limiter = limiter_for(client, key, 0)
    assert isinstance(limiter, Unlimited)
    assert all(limiter.acquire().granted for _ in range(100))
    with pytest.raises(ValueError):
        TokenBucket(client, key, rate=0)


def test_throttle_waits_for_a_reservation(client, key):
    bucket = TokenBucket(client, key, rate=10)
    throttle = Throttle(max_waiters=2)
    t0 = time.monotonic()
    for _ in range(4):
        throttle.wait("v", bucket)
    assert time.monotonic() - t0 >= 0.29


def test_throttle_caps_waiters_per_vendor(client, key):
    bucket = TokenBucket(client, key, rate=1)
    bucket.acquire()
    throttle = Throttle(max_waiters=1)
    waiting = threading.Thread(target=throttle.wait, args=("v", bucket))
    waiting.start()
    deadline = time.monotonic() + 2
    while throttle.waiting("v") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Throttled) as info:
        throttle.wait("v", bucket)
    assert info.value.retry_after > 0
    # Another vendor is not affected by v's waiters.
    throttle.wait("other", Unlimited())
    waiting.join()
    assert throttle.waiting("v") == 0
