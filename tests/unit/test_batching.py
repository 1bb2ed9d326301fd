"""The per-vendor batcher: size cap, max wait, one token per request, per-item outcomes, splitting."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker.batching import Batcher, BatchError, Sent
from worker.ratelimit import RateLimiter, Reservation, Unlimited
from worker.throttle import Throttled
from worker.vendors import Outcome, Verdict


class Recorder:
    """A send function: records each request's items, answers with ``answer(items)``."""

    def __init__(self, answer=None, delay: float = 0.0) -> None:
        self.requests: list[list] = []
        self.times: list[float] = []
        self.answer = answer or (lambda items: [Outcome(Verdict.DELIVERED, 200)] * len(items))
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.requests.append(list(items))
            self.times.append(time.monotonic())
        time.sleep(self.delay)
        return [Sent(o, batch=len(items), index=i) for i, o in enumerate(self.answer(items))]


class CountingLimiter(RateLimiter):
    """Grants every token, each ``wait`` seconds ahead; counts them."""

    def __init__(self, wait: float = 0.0, granted: bool = True) -> None:
        self.wait, self.granted, self.taken = wait, granted, 0
        self.lock = threading.Lock()

    def acquire(self, max_wait: float = 0.0) -> Reservation:
        with self.lock:
            if self.granted:
                self.taken += 1
            return Reservation(self.granted, self.wait)


def submit_all(batcher: Batcher, items, stagger: float = 0.0) -> list:
    """Submit every item from its own thread; return each one's Sent or the exception it raised."""
    def one(item):
        try:
            return batcher.submit(item)
        except Exception as exc:  # noqa: BLE001 - the tests look at it
            return exc

    with ThreadPoolExecutor(len(items)) as pool:
        futures = []
        for item in items:
            futures.append(pool.submit(one, item))
            if stagger:
                time.sleep(stagger)
        return [f.result(timeout=30) for f in futures]


def test_a_lone_item_goes_after_max_wait_in_a_request_of_its_own():
    send = Recorder()
    b = Batcher("v", Unlimited(), send, size=50, max_wait=0.2)
    t0 = time.monotonic()
    result = b.submit("a")
    took = time.monotonic() - t0
    assert result.outcome.verdict is Verdict.DELIVERED and result.batch == 1
    assert send.requests == [["a"]]
    assert 0.19 <= took < 2.0


def test_max_wait_zero_sends_at_once():
    send = Recorder()
    b = Batcher("v", Unlimited(), send, size=50, max_wait=0.0)
    t0 = time.monotonic()
    b.submit("a")
    assert time.monotonic() - t0 < 0.1


def test_items_arriving_within_max_wait_share_one_request_and_one_token():
    send, limiter = Recorder(), CountingLimiter()
    b = Batcher("v", limiter, send, size=50, max_wait=0.5)
    results = submit_all(b, list(range(10)), stagger=0.01)
    assert len(send.requests) == 1 and sorted(send.requests[0]) == list(range(10))
    assert limiter.taken == 1
    assert all(r.outcome.verdict is Verdict.DELIVERED and r.batch == 10 for r in results)
    assert b.waiting() == 0


def test_no_request_carries_more_than_size_and_a_full_batch_does_not_wait():
    send, limiter = Recorder(), CountingLimiter()
    b = Batcher("v", limiter, send, size=4, max_wait=1.0)
    t0 = time.monotonic()
    results = submit_all(b, list(range(10)))
    took = time.monotonic() - t0
    sizes = [len(r) for r in send.requests]
    assert max(sizes) <= 4 and sum(sizes) == 10 and len(sizes) >= 3
    assert sorted(i for r in send.requests for i in r) == list(range(10))
    assert limiter.taken == len(send.requests), "one token per request"
    assert all(isinstance(r, Sent) for r in results)
    assert send.times[0] - t0 < 0.5, "a full batch goes without waiting out max_wait"
    assert took < 1.0 + 2.0  # only the last, partial batch waits it out


def test_waiting_for_a_token_lets_more_items_join():
    send, limiter = Recorder(), CountingLimiter(wait=0.4)
    b = Batcher("v", limiter, send, size=50, max_wait=0.0)
    submit_all(b, ["first", "b", "c", "d"], stagger=0.05)
    assert send.requests[0] == ["first", "b", "c", "d"]
    assert limiter.taken == 1


def test_no_token_within_the_horizon_throttles_every_waiting_item_and_sends_nothing():
    send = Recorder()
    b = Batcher("v", CountingLimiter(wait=7.5, granted=False), send, size=50, max_wait=0.1)
    results = submit_all(b, ["a", "b", "c"])
    assert send.requests == []
    assert all(isinstance(r, Throttled) and r.vendor == "v" and r.retry_after == 7.5 for r in results)
    assert b.waiting() == 0
    b.limiter = Unlimited()  # the batcher keeps working afterwards
    assert b.submit("d").outcome.verdict is Verdict.DELIVERED


def test_each_item_gets_its_own_outcome():
    verdicts = {"ok": Outcome(Verdict.DELIVERED, 200), "later": Outcome(Verdict.RETRY, 503, 2.0),
                "bad": Outcome(Verdict.REJECTED, 404)}
    send = Recorder(lambda items: [verdicts[i] for i in items])
    b = Batcher("v", Unlimited(), send, size=50, max_wait=0.3)
    results = dict(zip(["ok", "later", "bad"], submit_all(b, ["ok", "later", "bad"]), strict=True))
    assert len(send.requests) == 1
    assert {k: (r.outcome.verdict, r.outcome.status) for k, r in results.items()} == {
        "ok": (Verdict.DELIVERED, 200), "later": (Verdict.RETRY, 503), "bad": (Verdict.REJECTED, 404)}
    assert [r.index for r in results.values()] == [send.requests[0].index(k) for k in results]


def named_rejection(items):
    """Like ConveYour's 422 with per-index errors: the bad items rejected, the rest not stored."""
    if not any(i.startswith("bad") for i in items):
        return [Outcome(Verdict.DELIVERED, 200)] * len(items)
    if len(items) == 1:
        return [Outcome(Verdict.REJECTED, 422, message="invalid")]
    return [Outcome(Verdict.REJECTED, 422, message=f"{i} is invalid") if i.startswith("bad")
            else Outcome(Verdict.RESEND, 422) for i in items]


def silent_rejection(items):
    """A 422 that does not say which items are bad."""
    if not any(i.startswith("bad") for i in items):
        return [Outcome(Verdict.DELIVERED, 200)] * len(items)
    if len(items) == 1:
        return [Outcome(Verdict.REJECTED, 422)]
    return [Outcome(Verdict.RESEND, 422)] * len(items)


def test_a_422_naming_bad_items_rejects_only_them_and_sends_the_rest_again_in_one_request():
    send, limiter = Recorder(named_rejection), CountingLimiter()
    b = Batcher("v", limiter, send, size=50, max_wait=0.3)
    items = [f"ok{i}" for i in range(8)] + ["bad1", "bad2"]
    results = dict(zip(items, submit_all(b, items), strict=True))
    assert {k for k, r in results.items() if r.outcome.verdict is Verdict.REJECTED} == {"bad1", "bad2"}
    assert {k for k, r in results.items() if r.outcome.verdict is Verdict.DELIVERED} == {f"ok{i}" for i in range(8)}
    assert results["bad1"].outcome.message == "bad1 is invalid"
    assert [len(r) for r in send.requests] == [10, 8]
    assert limiter.taken == 2, "the second request took a token of its own"


def test_a_422_without_per_item_errors_is_split_until_only_the_bad_item_is_rejected():
    send, limiter = Recorder(silent_rejection), CountingLimiter()
    b = Batcher("v", limiter, send, size=50, max_wait=0.3)
    items = [f"ok{i}" for i in range(15)] + ["bad"]
    results = dict(zip(items, submit_all(b, items), strict=True))
    assert [k for k, r in results.items() if r.outcome.verdict is Verdict.REJECTED] == ["bad"]
    assert all(r.outcome.verdict is Verdict.DELIVERED for k, r in results.items() if k != "bad")
    assert len(send.requests) <= 2 * 4 + 1, "halving: far fewer requests than one per item"
    assert ["bad"] in send.requests, "the bad item was finally judged alone"
    assert limiter.taken == len(send.requests)


def test_a_split_that_cannot_get_a_token_throttles_the_unsettled_items():
    class OneToken(CountingLimiter):
        def acquire(self, max_wait=0.0):
            if self.taken:
                return Reservation(False, 9.0)
            return super().acquire(max_wait)

    send = Recorder(named_rejection)
    b = Batcher("v", OneToken(), send, size=50, max_wait=0.3)
    results = dict(zip(["ok", "bad"], submit_all(b, ["ok", "bad"]), strict=True))
    assert results["bad"].outcome.verdict is Verdict.REJECTED
    assert isinstance(results["ok"], Throttled), "not stored and no token: back on the queue"
    assert len(send.requests) == 1


def test_a_failing_send_fails_every_item_of_its_batch_and_the_next_batch_still_works():
    def boom(items):
        raise RuntimeError("bug")

    b = Batcher("v", Unlimited(), boom, size=50, max_wait=0.2)
    results = submit_all(b, ["a", "b", "c"])
    assert all(isinstance(r, BatchError) and "bug" in str(r) for r in results)
    assert isinstance(results[0].__cause__, RuntimeError)
    b.send = Recorder()
    assert b.submit("d").outcome.verdict is Verdict.DELIVERED


def test_batches_go_out_concurrently_while_the_next_one_gathers():
    send = Recorder(delay=0.5)
    b = Batcher("v", Unlimited(), send, size=2, max_wait=0.0)
    t0 = time.monotonic()
    submit_all(b, list(range(6)))
    assert time.monotonic() - t0 < 1.4, "three 0.5 s requests should overlap"
    assert sum(len(r) for r in send.requests) == 6


@pytest.mark.parametrize("kwargs", [{"size": 0, "max_wait": 0.0}, {"size": 2, "max_wait": -1.0}])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Batcher("v", Unlimited(), Recorder(), **kwargs)
