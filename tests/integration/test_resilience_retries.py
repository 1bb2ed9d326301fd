"""Retries exhausted: exactly RETRY_MAX_ATTEMPTS attempts, growing jittered gaps, Retry-After honoured,
then one dead letter ``retries_exhausted`` with the attempt count. Attempts are counted at the sandbox.

Backoff is full jitter: the wait after failed attempt n is uniform in ``[0, min(MAX, BASE * 2**(n-1))]``,
so a single gap may be anything up to its cap. The checks are chosen to fail for a wrong product but not
by chance: every gap is within its cap (plus the worker's scheduling slack), the gaps of one delivery are
not all equal, gaps at one step differ between deliveries, and averaged over several deliveries the gaps grow.
"""

from __future__ import annotations

import statistics

import pytest

import worker
from worker.deadletters import DeadLetterStore
from worker.localstack import wait_until
from worker.retries.backoff import RETRY_AFTER_SPREAD, RETRY_AFTER_SPREAD_MAX

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ATTEMPTS = 6
BASE = 0.25
MAX = 4.0
#: Time between the vendor's answer and the next request beyond the countdown itself (task bookkeeping,
#: republishing the retry, the ETA timer's resolution). Generous: a missing backoff exceeds caps by far more.
SLACK = 0.5
EVENTS = 8


@pytest.fixture(scope="module")
def retry_worker(worker_factory):
    # The breaker off: an always-failing vendor would open it, and these tests count every attempt of each
    # delivery (tests/integration/test_breaker.py covers the breaker).
    return worker_factory("retries-w", RETRY_MAX_ATTEMPTS=ATTEMPTS, RETRY_BACKOFF_BASE=BASE, RETRY_BACKOFF_MAX=MAX,
                          BREAKER_THRESHOLD=0)


def cap(n: int) -> float:
    """Longest wait after failed attempt n (1-based)."""
    return min(MAX, BASE * 2 ** (n - 1))


def dead_letter(event_id: str):
    return [d for d in DeadLetterStore.default().list() if d.event_id == event_id]


def test_always_500_gets_exactly_max_attempts_with_growing_jittered_gaps(retry_worker, product_env, sandbox_client,
                                                                         unique_email):
    sandbox_client.configure("convertloop", fail_all=500)
    ids = {worker.track("doomed", email=f"{i}-{unique_email}", vendors=["convertloop"]): f"{i}-{unique_email}"
           for i in range(EVENTS)}
    entries = {eid: wait_until(lambda e=eid: dead_letter(e), timeout=sum(map(cap, range(1, ATTEMPTS))) + 20,
                               message=f"dead letter of {eid}")
               for eid in ids}

    gaps: dict[str, list[float]] = {}
    for eid, email in ids.items():
        times = sorted(r["ts"] for r in sandbox_client.requests(vendor="convertloop")
                       if r["body"]["person"]["email"] == email)
        assert len(times) == ATTEMPTS, f"{email}: {len(times)} attempts at the vendor, expected {ATTEMPTS}"
        gaps[eid] = [b - a for a, b in zip(times, times[1:], strict=False)]
        (entry,) = entries[eid]
        assert (entry.vendor, entry.reason, entry.status, entry.attempts) == \
            ("convertloop", "retries_exhausted", 500, ATTEMPTS)
        assert entry.event and entry.event["id"] == eid and entry.replayable

    means = [statistics.mean(g[n] for g in gaps.values()) for n in range(ATTEMPTS - 1)]
    print(f"\n{EVENTS} deliveries x {ATTEMPTS} attempts; caps {[cap(n) for n in range(1, ATTEMPTS)]} s")
    for g in gaps.values():
        print("  gaps " + " ".join(f"{x:5.2f}" for x in g))
    print("  mean " + " ".join(f"{x:5.2f}" for x in means)
          + f"   (full jitter expects {[cap(n) / 2 for n in range(1, ATTEMPTS)]})")

    for eid, g in gaps.items():
        for n, gap in enumerate(g, start=1):
            assert gap <= cap(n) + SLACK, f"gap {n} of {eid} is {gap:.2f}s; its cap is {cap(n)}s"
        assert max(g) - min(g) > 0.05, f"the gaps of {eid} are all equal: {g}"
    last = [g[-1] for g in gaps.values()]
    assert max(last) - min(last) > 0.2, f"no jitter: the last gaps are all alike {last}"
    # Expected means 0.125, 0.25, 0.5, 1, 2 s: compare steps far enough apart that chance cannot reverse them.
    assert means[4] > means[2] > means[0], f"the gaps do not grow: means {means}"
    assert means[3] > means[1]
    assert statistics.mean(means[3:]) > 2 * statistics.mean(means[:2])


def test_retry_after_is_honoured_between_attempts(retry_worker, product_env, sandbox_client, unique_email):
    failures = [{"status": 503, "retry_after": "3"}, 500, {"status": 503, "retry_after": "2"}, 500, 500, 500]
    assert len(failures) == ATTEMPTS
    sandbox_client.configure("loops", fail_next=failures)
    event_id = worker.track("doomed", email=unique_email, vendors=["loops"])
    (entry,) = wait_until(lambda: dead_letter(event_id), timeout=30, message="dead letter")
    got = [r for r in sandbox_client.requests(vendor="loops") if r["idempotency_key"] == event_id]
    assert [r["status"] for r in got] == [503, 500, 503, 500, 500, 500]
    gaps = [b["ts"] - a["ts"] for a, b in zip(got, got[1:], strict=False)]
    print("\nRetry-After 3 then 2: gaps " + " ".join(f"{x:.2f}" for x in gaps))
    for n, retry_after in ((0, 3), (2, 2)):
        spread = min(RETRY_AFTER_SPREAD_MAX, RETRY_AFTER_SPREAD * retry_after)
        assert retry_after <= gaps[n] <= retry_after + spread + SLACK, \
            f"gap {n + 1}: {gaps[n]:.2f}s, Retry-After {retry_after}"
    for n in (1, 3, 4):
        assert gaps[n] <= cap(n + 1) + SLACK
    assert (entry.reason, entry.status, entry.attempts) == ("retries_exhausted", 500, ATTEMPTS)
