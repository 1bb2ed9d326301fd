"""The Redis limiters (real Redis) and the per-process throttle.

No wall-clock thresholds: the window limiter runs on an injected clock, and the
token bucket's checks bracket its answers with Redis' own clock.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

from tests.helpers import ShutLimiter, max_in_window
from worker.dev.localstack import wait_until
from worker.limits import adaptive
from worker.limits.ratelimit import Admission, TokenBucket, Unlimited, WindowLimiter, limiter_for
from worker.limits.throttle import Throttle, Throttled


@pytest.fixture
def key(request):
    return f"test:ratelimit:{request.node.name}"


def redis_now(client) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def test_first_token_is_free_then_spacing_is_enforced(client, key):
    bucket = TokenBucket(client, key, rate=10)
    t0 = redis_now(client)
    assert bucket.acquire().granted
    refused = bucket.acquire(max_wait=0)
    reserved = bucket.acquire(max_wait=1)
    again = bucket.acquire(max_wait=1)
    passed = redis_now(client) - t0  # however slow the machine was between the calls
    assert not refused.granted and 0.1 - passed <= refused.wait <= 0.1
    assert reserved.granted and 0.1 - passed <= reserved.wait <= 0.1
    assert again.granted and 0.2 - passed <= again.wait <= 0.2


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
        # Never longer than the rate needs: i reservations ahead of this one, 1/20 s each.
        assert r.wait <= len(early) / 20 + 1e-6
        early.append(before + r.wait)
        late.append(after + r.wait)
    widest_gaps = [late[i + 1] - early[i] for i in range(39)]
    assert min(widest_gaps) >= 0.049
    assert late[-1] - early[0] >= 39 / 20 - 0.01


def test_shared_across_clients_and_threads(client, key, redis_server):
    """Eight threads with their own connections share one bucket: the rate holds for all."""
    granted: list[float] = []
    lock = threading.Lock()
    start = redis_now(client)
    t0 = time.monotonic()

    def run():
        own = TokenBucket(redis.Redis.from_url(redis_server.url), key, rate=50)
        # A second of contention, and on a loaded machine however long it takes to see two grants.
        while time.monotonic() - t0 < 1.0 or len(granted) < 2:
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
    end = redis_now(client)
    # Each grant moved the shared bucket on by 1/50 s from no earlier than `start`; grants
    # happened between `start` and `end` (Redis' clock), so at most one per 1/50 s of it.
    assert len(granted) >= 2
    assert float(client.get(key)) - start >= len(granted) / 50 - 1e-6
    assert len(granted) <= (end - start) * 50 + 1


def test_penalize_blocks_everyone_until_retry_after(client, key):
    bucket = TokenBucket(client, key, rate=100)
    t0 = redis_now(client)
    bucket.penalize(1.5)
    r = bucket.acquire(max_wait=0)
    passed = redis_now(client) - t0
    assert not r.granted and 1.5 - passed <= r.wait <= 1.5


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
    deadline = time.monotonic() + 20
    while throttle.waiting("v") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert throttle.waiting("v") == 1, "the first waiter never started waiting"
    with pytest.raises(Throttled) as info:
        throttle.wait("v", bucket)
    assert info.value.retry_after > 0
    # Another vendor is not affected by v's waiters.
    throttle.wait("other", Unlimited())
    waiting.join()
    assert throttle.waiting("v") == 0


# -- the window limiter, on an injected clock ---------------------------------------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def window(client, key, clock, rate=10.0, **kw):
    kw.setdefault("margin", 0.05)  # explicit: the arithmetic below does not follow the default
    kw.setdefault("cold_margin", 0.3)
    return WindowLimiter(client, key, rate, clock=clock, name="v", **kw)


def reserve(limiter, clock, n, max_wait=1000.0):
    """``n`` reservations made at the clock's current time: their send times."""
    out = []
    for _ in range(n):
        r = limiter.acquire(max_wait=max_wait)
        assert r.granted
        out.append(clock.now + r.wait)
    return out


def test_spacing_is_one_over_the_rate_and_n_per_window_plus_margin(client, key):
    clock = Clock()
    limiter = window(client, key, clock, cold_margin=0.05)
    sends = reserve(limiter, clock, 31)
    gaps = [round(b - a, 6) for a, b in zip(sends, sends[1:], strict=False)]
    assert min(gaps) == pytest.approx(0.1)
    # The 11th request waits for the 1st's latest arrival (+ margin) to leave the window.
    assert [round(sends[i + 10] - sends[i], 6) for i in range(21)] == [pytest.approx(1.05)] * 21
    assert 30 / (sends[-1] - sends[0]) == pytest.approx(10 / 1.05)  # 0.95 of the limit at full load


@pytest.mark.parametrize("rate", [10.0, 50.0])
def test_arrivals_late_by_up_to_the_margin_never_exceed_the_limit_in_any_window(client, key, rate):
    """Three processes (own limiters, one key), the first request of each cold: whatever lateness
    within its margin each request gets, no 1-second window holds more than N, at >= 0.9 of N."""
    import random

    rng = random.Random(7)
    clock = Clock()
    limiters = [window(client, key, clock, rate=rate) for _ in range(3)]
    sends, margins = [], []
    for i in range(int(rate * 12)):
        r = limiters[i % 3].acquire(max_wait=1000)
        assert r.granted
        sends.append(clock.now + r.wait)
        margins.append(0.3 if i < 3 else 0.05)
        clock.now = max(clock.now, sends[-1] - 1.0)  # callers reserve up to ~1 s ahead
    for _ in range(200):
        arrivals = [s + rng.choice((0.0, m, rng.uniform(0, m))) for s, m in zip(sends, margins, strict=True)]
        assert max_in_window(arrivals) <= rate
    # More lateness than allowed for would crowd a window: the check can fail.
    assert any(max_in_window([s + (0.15 if i == late else 0.0) for i, s in enumerate(sends)]) > rate
               for late in range(len(sends)))
    assert (len(sends) - 1) / (sends[-1] - sends[0]) >= 0.9 * rate


def test_lateness_shifting_the_first_requests_cannot_crowd_a_window(client, key):
    """The issue's case: the first requests (cold connections) arrive 0.3 s late, the rest on time."""
    clock = Clock()
    limiter = window(client, key, clock)
    sends = reserve(limiter, clock, 40)
    # Thread-local cold flag: only this thread's first request was cold.
    arrivals = [sends[0] + 0.3] + sends[1:]
    assert max_in_window(sorted(arrivals)) <= 10
    naive = [1000 + i / 10 for i in range(40)]  # 1/rate spacing without the log
    assert max_in_window(sorted([naive[0] + 0.3] + naive[1:])) > 10  # ... would have crowded one


def test_retry_after_pause_then_waiters_leave_spaced(client, key):
    clock = Clock()
    limiter = window(client, key, clock)
    reserve(limiter, clock, 1)
    limiter.penalize(2.0)
    assert not limiter.acquire(max_wait=1.9).granted
    waits = [limiter.acquire(max_wait=10).wait for _ in range(8)]  # eight waiters at the same moment
    assert waits[0] == pytest.approx(2.0)
    assert [round(b - a, 6) for a, b in zip(waits, waits[1:], strict=False)] == [pytest.approx(0.1)] * 7


def test_a_429_cuts_the_rate_for_every_worker_and_it_climbs_back(client, key, caplog):
    clock = Clock()
    a, b = window(client, key, clock), window(client, key, clock)  # two processes
    reserve(a, clock, 1)
    for _ in range(6):
        a.observe(200, {})
    a.observe(429, {})  # one 429 alone never cuts
    assert b.effective_rate() == 10.0
    with caplog.at_level("INFO", logger="worker.limits.ratelimit"):
        a.observe(429, {})  # two: a quarter of the window's answers: -25 %
        a.observe(429, {})  # the same burst: one cut
    assert b.effective_rate() == pytest.approx(7.5)
    assert [r.getMessage() for r in caplog.records] == ["v: effective rate 10.0 -> 7.5/s after 429"]
    clock.now += adaptive.CUT_GAP
    b.observe(429, {})  # nothing but 429s since the cut (a's and b's): halved, the most one cut takes
    assert a.effective_rate() == pytest.approx(3.75)
    # Quiet windows: +5 % each, at most halfway towards 0.97 x the rate that drew the last cut (7.5) ...
    rates = []
    for _ in range(20):  # 40 s: within BAD_TTL
        clock.now += adaptive.QUIET
        a.acquire(max_wait=100)
        rates.append(round(b.effective_rate(), 4))
    assert rates[0] == pytest.approx(3.75 * adaptive.INCREASE, abs=1e-3)
    assert all(x < y for x, y in zip(rates, rates[1:8], strict=False)) and max(rates) < 7.275
    assert rates[-1] > 7.0  # and it gets there
    # ... and once that 429 is forgotten, +5 % a window up to the configured ceiling, never above.
    clock.now += adaptive.BAD_TTL
    for _ in range(20):
        clock.now += adaptive.QUIET
        b.acquire(max_wait=100)
    assert a.effective_rate() == 10.0


def test_a_stray_429_does_not_cut(client, key):
    clock = Clock()
    limiter = window(client, key, clock)
    reserve(limiter, clock, 1)
    for _ in range(19):
        limiter.observe(200, {})
    limiter.observe(429, {})  # 5 % of the window
    assert limiter.effective_rate() == 10.0


def test_window_full_holds_the_rate(client, key):
    clock = Clock()
    limiter = window(client, key, clock)
    reserve(limiter, clock, 1)
    limiter.observe(429, {})
    limiter.observe(429, {})
    for _ in range(3):
        limiter.observe(200, {"x-ratelimit-remaining": "0"})
        clock.now += adaptive.QUIET
        limiter.acquire(max_wait=100)
    assert limiter.effective_rate() == pytest.approx(5.0)


def test_announced_lower_limit_is_followed_then_forgotten(client, key):
    clock = Clock()
    a, b = window(client, key, clock), window(client, key, clock)
    a.observe(200, {"x-ratelimit-limit": "4", "x-ratelimit-remaining": "3"})
    assert b.effective_rate() == 4.0
    sends = reserve(b, clock, 9)
    assert round(sends[4] - sends[0], 6) == pytest.approx(1.3)  # 4 per window, b's first request cold
    b.observe(200, {"x-ratelimit-limit": "25"})  # more than configured: the configured 10 stays the ceiling
    clock.now += adaptive.ANNOUNCED_TTL + adaptive.QUIET
    for _ in range(30):
        clock.now += adaptive.QUIET
        a.acquire(max_wait=1000)
    assert a.effective_rate() == 10.0


def test_healthy_answers_cost_no_round_trip(client, key):
    limiter = window(client, key, Clock())

    def scripts_run() -> int:
        return client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)

    limiter.acquire()
    before = scripts_run()
    for _ in range(50):
        limiter.observe(200, {})
        limiter.observe(200, {"x-ratelimit-limit": "10", "x-ratelimit-remaining": "4"})
    assert scripts_run() - before == 1  # the first announcement only; the rest ride on the next acquire


def test_bad_limiter_configuration_is_refused(client, key):
    with pytest.raises(ValueError, match="rate must be a positive number"):
        WindowLimiter(client, key, float("nan"))
    with pytest.raises(ValueError, match="margin"):
        WindowLimiter(client, key, 10, margin=-0.1)
    with pytest.raises(ValueError, match="margin"):
        WindowLimiter(client, key, 10, margin=0.2, cold_margin=0.1)
    from pydantic import ValidationError

    from worker.settings import Settings

    with pytest.raises(ValidationError, match="rate_limit_margin"):
        Settings(rate_limit_margin=1.5)


def test_limiter_for_gives_the_window_limiter(client, key):
    limiter = limiter_for(client, key, 10, margin=0.02, cold_margin=0.2)
    assert isinstance(limiter, WindowLimiter) and limiter.margin == 0.02 and limiter.cold_margin == 0.2
    assert limiter.acquire().granted and Unlimited().effective_rate() is None


def test_throttle_takes_a_new_slot_after_waking_too_late(client, key):
    """The last look is on the limiter's clock (Redis' in production): a slot woken up for later than
    the tolerance is given up (taken out of the log, so nothing sends on it) and another one taken."""
    clock = Clock()
    limiter = window(client, key, clock, margin=0.02)
    reserve(limiter, clock, 1)
    slept = []

    def sleep(seconds):  # the first wake-up is 50 ms late: more than the limiter's tolerance (10 ms)
        slept.append(seconds)
        clock.now += seconds + (0.05 if len(slept) == 1 else 0)

    clock.now -= 0.09  # the next slot is 10 ms away
    Throttle(sleep=sleep).wait("v", limiter)
    assert len(slept) == 2 and slept[1] == pytest.approx(0.05, abs=1e-6)  # the next slot: 100 ms after the first
    log = client.zrange(f"{key}:log", 0, -1)
    assert len(log) == 2  # the slot given up is gone; the first reservation and the one sent on remain


def test_the_last_look_admits_a_slot_on_time_and_says_how_late(client, key):
    clock = Clock()
    limiter = window(client, key, clock, margin=0.02)
    reserve(limiter, clock, 1)
    r = limiter.acquire(max_wait=1.0)
    assert r.granted and r.wait == pytest.approx(0.1)
    early = limiter.admit(r)
    assert not early.admitted and early.wait == pytest.approx(0.1) and early.why == ""
    clock.now += 0.105
    on_time = limiter.admit(r)
    assert on_time.admitted and on_time.wait == pytest.approx(0.005, abs=1e-6)
    clock.now += 0.01  # 15 ms late: past the tolerance, but a holder that kept waking late may go
    assert limiter.admit(r, strict=False).admitted
    late = limiter.admit(r)
    assert not late.admitted and late.why == "late"
    assert len(client.zrange(f"{key}:log", 0, -1)) == 1


def test_a_pause_or_a_cut_revokes_slots_reserved_before_it(client, key):
    clock = Clock()
    a, b = window(client, key, clock), window(client, key, clock)
    held = b.acquire(max_wait=10)
    ahead = b.acquire(max_wait=10)
    assert a.still_valid(held) and b.still_valid(ahead)
    a.penalize(3.0)
    assert not b.still_valid(ahead)
    revoked = b.admit(ahead)
    assert not revoked.admitted and revoked.why == "revoked"
    after = b.acquire(max_wait=10)
    assert after.wait >= 3.0 and b.still_valid(after)
    clock.now += adaptive.CUT_GAP
    for _ in range(4):
        a.observe(429, {})
    assert not b.still_valid(after)


def test_redis_away_after_a_slot_was_granted_does_not_fail_the_delivery(redis_server, key):
    """A waiter's check after its sleep, and observing an answer, survive a Redis restart."""
    from worker.dev.localstack import RedisServer

    own = RedisServer().start()
    c = redis.Redis.from_url(own.url)
    try:
        limiter = window(c, key, Clock())
        held = limiter.acquire(max_wait=1)
    finally:
        own.stop()
    assert limiter.still_valid(held)
    limiter.observe(429, {"x-ratelimit-limit": "4"})  # logged, not raised


def test_a_waiter_gives_up_after_max_total_and_the_message_is_requeued():
    """A vendor paused far longer than a delivery may hold its message: the thread stops waiting after
    ``max_total`` (its message goes back on the queue) instead of holding it past the visibility timeout."""
    from worker.limits.ratelimit import RateLimiter, Reservation
    from worker.limits.throttle import Throttle, Throttled

    class Paused(RateLimiter):
        calls = 0

        def acquire(self, max_wait: float = 0.0) -> Reservation:
            Paused.calls += 1
            return Reservation(False, 600.0)

    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    throttle = Throttle(sleep=sleep, max_total=5.0, clock=lambda: now[0])
    with pytest.raises(Throttled):
        throttle.wait("loops", Paused())
    assert 5.0 <= now[0] <= 5.0 + throttle.horizon and Paused.calls >= 2
    assert throttle.waiting("loops") == 0


def test_a_429_with_k_requests_in_the_last_second_cuts_to_k_minus_1(client, key, caplog):
    """Configured 10, the vendor really lets 5 through: the 429 on the 6th request of a second says so."""
    clock = Clock()
    a, b = window(client, key, clock), window(client, key, clock)  # two processes share the log
    for limiter in (a, b, a, b, a, b):
        reserve(limiter, clock, 1)
        clock.now += 0.1
    with caplog.at_level("INFO", logger="worker.limits.ratelimit"):
        b.observe(429, {})  # one 429 is enough: 6 of ours in the last second
    assert a.effective_rate() == pytest.approx(5.0)
    assert [r.getMessage() for r in caplog.records] == [
        "v: effective rate 10.0 -> 5.0/s after 429 with 6 requests in the last second"]


def test_a_stray_429_at_the_right_rate_cuts_next_to_nothing_and_never_more_than_half(client, key):
    clock = Clock()
    limiter = window(client, key, clock, rate=50.0)
    for _ in range(51):  # a full second at 50/s, and one more
        reserve(limiter, clock, 1)
        clock.now += 0.02
    limiter.observe(429, {})
    assert limiter.effective_rate() >= 49.0  # ~50 of ours in the last second: the rate already, give or take one
    clock2 = Clock()
    other = window(client, key + ":2", clock2, rate=10.0)
    reserve(other, clock2, 2)
    clock2.now += 0.5
    other.observe(429, {})  # 2 in the last second would say 1/s: one cut at most halves
    assert other.effective_rate() == pytest.approx(5.0)


def test_the_transport_says_which_request_opens_a_connection(client, key):
    """With ``warm`` (the HTTP transport: an idle connection to the vendor at hand), a request is cold when
    none is, whatever thread (or greenlet: the gevent pool runs each task in a new one) sends it."""
    clock = Clock()
    at_hand = [False]
    limiter = window(client, key, clock, margin=0.02, cold_margin=0.3, warm=lambda: at_hand[0])
    limiter.acquire(max_wait=10)  # no connection yet: logged with the cold margin
    at_hand[0] = True
    limiter.acquire(max_wait=10)  # the next one reuses it: the warm margin
    scores = [s for _, s in client.zrange(f"{key}:log", 0, -1, withscores=True)]
    assert scores == [pytest.approx(1000.12), pytest.approx(1000.3)]  # (by score) the second: 0.1 s later, warm


def test_an_answer_read_late_is_not_sent_on(client, key):
    """Redis admits a slot in time, but the thread reads the answer later than the tolerance (not scheduled
    at once): it must not send on it (the slot stays logged, unused); an answer read in time is sent on."""
    clock = Clock()
    limiter = window(client, key, clock, margin=0.02)
    ticks = iter([0.0, 0.002, 10.0, 10.03, 20.0, 20.001])  # round trips: 2 ms, 30 ms, then the last look's
    limiter._stopwatch = lambda: next(ticks)
    first = limiter.acquire(max_wait=0.0)
    assert first.granted and first.wait == 0 and limiter.hold(first, time.sleep).admitted
    clock.now += 0.1
    second = limiter.acquire(max_wait=0.0)
    assert second.granted and second.rtt == pytest.approx(0.03)
    clock.now += 0.03  # what the thread did not see: Redis' clock went on meanwhile
    assert limiter.hold(second, time.sleep) == Admission(False, 0.0, "late")


def test_a_vendor_whose_limit_binds_is_taken_one_message_at_a_time(client, key):
    """While a delivery found no token free at once in the last BINDING_FOR seconds, the consumer takes the vendor's
    queue one message at a time (room 0): a take of several would mostly be thrown back as Throttled."""
    from worker.limits import throttle as throttling

    clock = Clock()
    throttle = Throttle(max_waiters=1, clock=clock, sleep=lambda seconds: None)
    throttle.wait("bound-v", Unlimited())
    assert throttling.room("bound-v") is None, "a token free at once: no cap"
    bucket = TokenBucket(client, key, rate=1)
    bucket.acquire()
    throttle.wait("bound-v", bucket)  # waited (the sleep stubbed) for the next token
    assert throttling.room("bound-v") == 0 and throttling.room("other-v") is None
    clock.now += throttling.BINDING_FOR + 0.1
    assert throttling.room("bound-v") is None


def test_the_throttle_tells_its_listeners_when_a_vendors_waiters_crowd_and_when_they_thin_out(monkeypatch):
    """Two thirds of the waiters taken: told (vendor, True), once; a third or fewer again: (vendor, False), once.
    The hard cap still throws a delivery back; a listener that fails fails no delivery."""
    from worker.limits import throttle as throttling

    told: list[tuple[str, bool, int]] = []
    limiter = ShutLimiter()
    throttle = Throttle(max_waiters=6, sleep=limiter.sleep, max_total=3600)  # waiters wait until opened, however long
    assert (throttle.crowd_at, throttle.uncrowd_at) == (4, 2)

    def listener(vendor: str, crowded: bool) -> None:
        told.append((vendor, crowded, throttle.waiting(vendor)))

    def broken(vendor: str, crowded: bool) -> None:
        raise RuntimeError("a listener's bug")

    monkeypatch.setattr(throttling, "_listeners", [])
    throttling.watch(broken)
    throttling.watch(listener)
    throttling.watch(listener)  # once is enough
    threads = []
    for n in range(1, 7):
        t = threading.Thread(target=throttle.wait, args=("v", limiter), daemon=True)  # a failed test leaves it
        t.start()
        threads.append(t)
        # A waiter asks for a token again after it told the listeners (if it did): all have asked so.
        wait_until(lambda n=n: sum(waiter for _, waiter in limiter.asked) == n, timeout=20,
                   message=f"waiter {n} to wait")
        assert throttle.waiting("v") == n
        assert told == ([] if n < 4 else [("v", True, 4)])
    with pytest.raises(Throttled):  # the sixth waits: a seventh is thrown back
        throttle.wait("v", limiter)
    throttle.wait("other", Unlimited())  # another vendor is not crowded
    assert told == [("v", True, 4)]
    limiter.opened.set()
    for t in threads:
        t.join(20)
    assert throttle.waiting("v") == 0
    assert [(v, crowded) for v, crowded, _ in told] == [("v", True), ("v", False)]
    assert told[1][2] <= 2, "told thinned out only at a third of the waiters"


def test_an_admitted_slot_says_by_when_its_request_must_leave(client, key):
    """What is left of the margin once the slot is admitted, less the way to the vendor: a thread that got no CPU
    between the last look and the send is as late as one that woke late. Too small a margin to split: no deadline."""
    from worker.limits.ratelimit import SEND_ALLOWANCE

    margin = 0.9  # a lateness tolerance of 0.45 s: admitted on any machine that runs the test at all
    limiter = WindowLimiter(client, key, rate=50, margin=margin, cold_margin=margin)
    before = time.monotonic()
    now = limiter.acquire(max_wait=0.0)
    admission = limiter.hold(now, time.sleep)
    after = time.monotonic()
    assert admission.admitted and admission.send_by is not None
    assert before < admission.send_by <= after + margin - SEND_ALLOWANCE
    ahead = limiter.acquire(max_wait=1.0)  # the next slot, 20 ms on: waited for, then the last look
    assert ahead.granted and ahead.wait > 0
    waited = limiter.hold(ahead, time.sleep)
    if waited.admitted:  # (a thread woken too late gives the slot up: no deadline to check then)
        assert waited.send_by is not None and waited.send_by <= time.monotonic() + margin - SEND_ALLOWANCE
    tight = WindowLimiter(client, key + ":tight", rate=50, margin=0.01)
    assert tight.hold(tight.acquire(max_wait=0.0), time.sleep).send_by is None
    assert Unlimited().hold(Unlimited().acquire(), time.sleep).send_by is None
