"""The per-vendor batcher: size cap, max wait, one token per request, per-item outcomes, splitting.

No assertion here depends on how fast a loaded machine runs, nor on every thread submitting
within ``max_wait``: a batch that must hold several items is triggered by its size (``size``
equal to the number of items, ``max_wait`` far longer than the test), or the batcher's clock
stands still until every item is waiting; where a test used to time something, it now waits
for a positive signal (a barrier all concurrent requests must reach, the gather's condition
waits and how each ended, an injected sleep that waits until the items joined). The only
duration asserted is a lower bound (waiting out ``max_wait``), which load cannot break.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker.delivery import batching
from worker.delivery.batching import Batcher, BatchError, Sent
from worker.limits.ratelimit import RateLimiter, Reservation, Unlimited
from worker.limits.throttle import Throttled
from worker.vendors import Outcome, Verdict


class Recorder:
    """A send function: records each request's items, answers with ``answer(items)``.

    With ``overlap=(k, total)``, every request waits (at most 20 s) until ``k`` requests have been
    in flight at once, or all ``total`` items were handed over; ``peak`` is the most in flight at once.
    """

    def __init__(self, answer=None, overlap: tuple[int, int] | None = None) -> None:
        self.requests: list[list] = []
        self.times: list[float] = []
        self.answer = answer or (lambda items: [Outcome(Verdict.DELIVERED, 200)] * len(items))
        self.overlap = overlap
        self.in_flight = self.peak = 0
        self.lock = threading.Condition()

    def __call__(self, items):
        with self.lock:
            self.requests.append(list(items))
            self.times.append(time.monotonic())
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.lock.notify_all()
            if self.overlap:
                k, total = self.overlap
                self.lock.wait_for(lambda: self.peak >= k or sum(map(len, self.requests)) >= total, timeout=20)
            self.in_flight -= 1
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


class WaitSpy:
    """Wraps the batcher's condition; records every timed wait the gathering does, and how it ended
    (True: notified, False: timed out)."""

    def __init__(self, condition: threading.Condition) -> None:
        self.condition, self.waits, self.ended = condition, [], []

    def __getattr__(self, name):
        return getattr(self.condition, name)

    def __enter__(self):
        return self.condition.__enter__()

    def __exit__(self, *exc):
        return self.condition.__exit__(*exc)

    def wait(self, timeout=None):
        self.waits.append(timeout)
        self.ended.append(self.condition.wait(timeout))
        return self.ended[-1]


def test_a_lone_item_goes_after_max_wait_in_a_request_of_its_own():
    send = Recorder()
    b = Batcher("v", Unlimited(), send, size=50, max_wait=0.2)
    b._more = spy = WaitSpy(b._more)
    t0 = time.monotonic()
    result = b.submit("a")
    took = time.monotonic() - t0
    assert result.outcome.verdict is Verdict.DELIVERED and result.batch == 1
    assert send.requests == [["a"]]
    assert took >= 0.19  # it did wait max_wait (a lower bound: load only makes it longer)
    # ...and then went, rather than waiting for company: every wait of the gathering was for what was left of
    # max_wait, and the last one ran out (nobody notified it).
    assert spy.waits and all(w is not None and 0 < w <= 0.2 for w in spy.waits), spy.waits
    assert spy.ended[-1] is False


def test_max_wait_zero_sends_at_once():
    send = Recorder()
    b = Batcher("v", Unlimited(), send, size=50, max_wait=0.0)
    b._more = spy = WaitSpy(b._more)
    assert b.submit("a").outcome.verdict is Verdict.DELIVERED
    assert send.requests == [["a"]]
    assert spy.waits == [], "with max_wait=0 the leader sends without waiting for more items"


class StillClock:
    """The batcher's ``time`` while ``items`` items are being submitted: its clock stands still until they are
    all waiting (as if they arrived at once), then jumps past any ``max_wait``. So "items that arrive within
    max_wait" does not depend on how fast a loaded machine starts the submitting threads."""

    def __init__(self, batcher: Batcher, items: int) -> None:
        self.batcher, self.items = batcher, items

    def monotonic(self) -> float:
        # Called by the batcher under its lock: read the queue without taking it.
        return 0.0 if len(self.batcher._pending) < self.items else 1e6

    sleep = staticmethod(time.sleep)


def test_items_arriving_within_max_wait_share_one_request_and_one_token(monkeypatch):
    send, limiter = Recorder(), CountingLimiter()
    b = Batcher("v", limiter, send, size=50, max_wait=0.2)
    monkeypatch.setattr(batching, "time", StillClock(b, 10))
    results = submit_all(b, list(range(10)), stagger=0.01)
    assert len(send.requests) == 1 and sorted(send.requests[0]) == list(range(10))
    assert limiter.taken == 1
    assert all(r.outcome.verdict is Verdict.DELIVERED and r.batch == 10 for r in results)
    assert b.waiting() == 0


def test_no_request_carries_more_than_size_and_a_full_batch_does_not_wait():
    send, limiter = Recorder(), CountingLimiter()
    # 12 items, size 4: three full batches. max_wait is far longer than the test: every gathering wait must
    # end by a notification (a full batch), none by running out. A batcher that waited out max_wait for a full
    # batch would make submit_all give up (30 s) and fail.
    b = Batcher("v", limiter, send, size=4, max_wait=600.0)
    b._more = spy = WaitSpy(b._more)
    results = submit_all(b, list(range(12)))
    sizes = [len(r) for r in send.requests]
    assert sizes == [4, 4, 4]
    assert sorted(i for r in send.requests for i in r) == list(range(12))
    assert limiter.taken == len(send.requests), "one token per request"
    assert all(isinstance(r, Sent) for r in results)
    assert False not in spy.ended, "a full batch goes without waiting out max_wait"


def test_waiting_for_a_token_lets_more_items_join():
    send, limiter = Recorder(), CountingLimiter(wait=0.4)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        """The leader's wait for its token: over when the other three items are waiting too."""
        slept.append(seconds)
        deadline = time.monotonic() + 20
        while b.waiting() < 4 and time.monotonic() < deadline:
            time.sleep(0.005)

    b = Batcher("v", limiter, send, size=50, max_wait=0.0, sleep=sleep)
    first = threading.Thread(target=b.submit, args=("first",))
    first.start()
    deadline = time.monotonic() + 20
    while not slept and time.monotonic() < deadline:  # the leader took its token and waits for it
        time.sleep(0.005)
    assert slept == [0.4]
    submit_all(b, ["b", "c", "d"])
    first.join(20)
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
    b = Batcher("v", Unlimited(), send, size=3, max_wait=600.0)  # one batch of all three, triggered by its size
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
    b = Batcher("v", limiter, send, size=10, max_wait=600.0)  # one batch of all ten, triggered by its size
    items = [f"ok{i}" for i in range(8)] + ["bad1", "bad2"]
    results = dict(zip(items, submit_all(b, items), strict=True))
    assert {k for k, r in results.items() if r.outcome.verdict is Verdict.REJECTED} == {"bad1", "bad2"}
    assert {k for k, r in results.items() if r.outcome.verdict is Verdict.DELIVERED} == {f"ok{i}" for i in range(8)}
    assert results["bad1"].outcome.message == "bad1 is invalid"
    assert [len(r) for r in send.requests] == [10, 8]
    assert limiter.taken == 2, "the second request took a token of its own"


def test_a_422_without_per_item_errors_is_split_until_only_the_bad_item_is_rejected():
    send, limiter = Recorder(silent_rejection), CountingLimiter()
    b = Batcher("v", limiter, send, size=16, max_wait=600.0)  # one batch of all sixteen, triggered by its size
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
    b = Batcher("v", OneToken(), send, size=2, max_wait=600.0)  # one batch of both, triggered by its size
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
    # Each request is held until three are in flight at once (6 items, at most 2 a request: at least
    # three requests). Requests sent one after another never overlap: each waits out its 20 s and
    # submit_all gives up after 30 s, so the test fails (slowly) instead of hanging.
    send = Recorder(overlap=(3, 6))
    b = Batcher("v", Unlimited(), send, size=2, max_wait=0.0)
    results = submit_all(b, list(range(6)))
    assert all(isinstance(r, Sent) for r in results), results
    assert sum(len(r) for r in send.requests) == 6
    assert send.peak >= 3, "three requests were on the wire at once"


@pytest.mark.parametrize("kwargs", [{"size": 0, "max_wait": 0.0}, {"size": 2, "max_wait": -1.0}])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Batcher("v", Unlimited(), Recorder(), **kwargs)


def test_a_split_past_its_deadline_sends_nothing_more_and_puts_the_items_back():
    """A refused bulk request is split only while the batch is within its deadline (set inside the visibility
    timeout): the items not yet judged go back to the queue (Throttled), never held past it."""
    send, limiter = Recorder(silent_rejection), CountingLimiter()
    b = Batcher("v", limiter, send, size=4, max_wait=60, deadline=-1)  # full at once; any split is past it
    items = [f"ok{i}" for i in range(3)] + ["bad"]
    results = submit_all(b, items)
    assert len(send.requests) == 1 and sorted(send.requests[0]) == sorted(items)
    assert all(isinstance(r, Throttled) for r in results)
