"""Retries exhausted: exactly RETRY_MAX_ATTEMPTS attempts, growing jittered gaps, Retry-After honoured,
then one dead letter ``retries_exhausted`` with the attempt count. Attempts are counted at the sandbox.

Backoff is full jitter: the wait after failed attempt n is uniform in ``[0, min(MAX, BASE * 2**(n-1))]``.
The waits checked are the ones the worker chose (its log line ``retrying ... attempt=n in X.XXs``), not the
gaps between requests, which a loaded machine stretches: every chosen wait is within its cap, every gap at
the vendor is at least its wait (the retry never came early), the waits of one delivery are not all equal,
waits at one step differ between deliveries, and averaged over several deliveries they grow (comparisons
chosen so far apart that chance cannot reverse them).
"""

from __future__ import annotations

import re
import statistics

import pytest

import worker
from worker.delivery.deadletters import DeadLetterStore
from worker.dev.localstack import wait_until
from worker.retries.backoff import RETRY_AFTER_SPREAD, RETRY_AFTER_SPREAD_MAX

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ATTEMPTS = 6
BASE = 0.25
MAX = 4.0
EVENTS = 8
#: The worker logs each wait it chose with two decimals.
ROUNDING = 0.005
#: "retrying <vendor> event=<id> status=<status> attempt=<n> in <wait>s ..." (worker/delivery/pipeline.py)
RETRYING = re.compile(r"retrying \w+ event=(\S+) status=\S+ attempt=(\d+) in ([0-9.]+)s")


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


def chosen_waits(log: str, event_id: str) -> list[float]:
    """The waits the worker chose after each failed attempt of ``event_id`` but the last, in attempt order."""
    waits = {int(m[2]): float(m[3]) for m in RETRYING.finditer(log) if m[1] == event_id}
    assert sorted(waits) == list(range(1, ATTEMPTS)), f"{event_id}: the worker logged waits after {sorted(waits)}"
    return [waits[n] for n in range(1, ATTEMPTS)]


@pytest.mark.timeout(600)  # its own waits: about 260 s
def test_always_500_gets_exactly_max_attempts_with_growing_jittered_gaps(retry_worker, product_env, sandbox_client,
                                                                         unique_email):
    sandbox_client.configure("convertloop", fail_all=500)
    ids = {worker.track("doomed", email=f"{i}-{unique_email}", vendors=["convertloop"]): f"{i}-{unique_email}"
           for i in range(EVENTS)}
    entries = {eid: wait_until(lambda e=eid: dead_letter(e), timeout=sum(map(cap, range(1, ATTEMPTS))) + 20,
                               message=f"dead letter of {eid}")
               for eid in ids}

    gaps: dict[str, list[float]] = {}
    log = retry_worker.log()  # each "retrying" line was written before the attempt after it was made
    waits = {eid: chosen_waits(log, eid) for eid in ids}
    for eid, email in ids.items():
        times = sorted(r["ts"] for r in sandbox_client.requests(vendor="convertloop")
                       if r["body"]["person"]["email"] == email)
        assert len(times) == ATTEMPTS, f"{email}: {len(times)} attempts at the vendor, expected {ATTEMPTS}"
        gaps[eid] = [b - a for a, b in zip(times, times[1:], strict=False)]
        (entry,) = entries[eid]
        assert (entry.vendor, entry.reason, entry.status, entry.attempts) == \
            ("convertloop", "retries_exhausted", 500, ATTEMPTS)
        assert entry.event and entry.event["id"] == eid and entry.replayable

    means = [statistics.mean(w[n] for w in waits.values()) for n in range(ATTEMPTS - 1)]
    print(f"\n{EVENTS} deliveries x {ATTEMPTS} attempts; caps {[cap(n) for n in range(1, ATTEMPTS)]} s")
    for eid in ids:
        print("  waits " + " ".join(f"{x:5.2f}" for x in waits[eid])
              + "   gaps " + " ".join(f"{x:5.2f}" for x in gaps[eid]))
    print("  mean  " + " ".join(f"{x:5.2f}" for x in means)
          + f"   (full jitter expects {[cap(n) / 2 for n in range(1, ATTEMPTS)]})")

    for eid, w in waits.items():
        for n, (wait, gap) in enumerate(zip(w, gaps[eid], strict=True), start=1):
            assert wait <= cap(n) + ROUNDING, f"wait {n} of {eid} is {wait:.2f}s; its cap is {cap(n)}s"
            assert gap >= wait - 2 * ROUNDING, f"attempt {n + 1} of {eid} came {gap:.3f}s after attempt {n}, " \
                                               f"before its wait of {wait:.2f}s"
        assert len(set(w)) > 1, f"the waits of {eid} are all equal: {w}"
    assert any(w[n] < cap(n + 1) - ROUNDING for w in waits.values() for n in range(ATTEMPTS - 1)), \
        "every wait is its cap: no jitter"
    last = [w[-1] for w in waits.values()]
    assert max(last) - min(last) > 0.2, f"no jitter: the last waits are all alike {last}"
    # Expected means 0.125, 0.25, 0.5, 1, 2 s over 8 deliveries: compare steps so far apart (4.5 standard
    # deviations or more) that chance cannot reverse them.
    assert means[4] > means[0], f"the waits do not grow: means {means}"
    assert statistics.mean(means[3:]) > 2 * statistics.mean(means[:2]), f"the waits do not grow: means {means}"


def test_retry_after_is_honoured_between_attempts(retry_worker, product_env, sandbox_client, unique_email):
    failures = [{"status": 503, "retry_after": "3"}, 500, {"status": 503, "retry_after": "2"}, 500, 500, 500]
    assert len(failures) == ATTEMPTS
    sandbox_client.configure("loops", fail_next=failures)
    event_id = worker.track("doomed", email=unique_email, vendors=["loops"])
    (entry,) = wait_until(lambda: dead_letter(event_id), timeout=30, message="dead letter")
    got = [r for r in sandbox_client.requests(vendor="loops") if r["idempotency_key"] == event_id]
    assert [r["status"] for r in got] == [503, 500, 503, 500, 500, 500]
    gaps = [b["ts"] - a["ts"] for a, b in zip(got, got[1:], strict=False)]
    waits = chosen_waits(retry_worker.log(), event_id)
    print("\nRetry-After 3 then 2: waits " + " ".join(f"{x:.2f}" for x in waits)
          + ", gaps " + " ".join(f"{x:.2f}" for x in gaps))
    for n, retry_after in ((0, 3), (2, 2)):
        spread = min(RETRY_AFTER_SPREAD_MAX, RETRY_AFTER_SPREAD * retry_after)
        assert retry_after - ROUNDING <= waits[n] <= retry_after + spread + ROUNDING, \
            f"wait {n + 1}: {waits[n]:.2f}s, Retry-After {retry_after}"
        assert gaps[n] >= retry_after, f"gap {n + 1}: {gaps[n]:.2f}s, Retry-After {retry_after}"
    for n in (1, 3, 4):
        assert waits[n] <= cap(n + 1) + ROUNDING
    for n, (wait, gap) in enumerate(zip(waits, gaps, strict=True), start=1):
        assert gap >= wait - 2 * ROUNDING, f"attempt {n + 1} came {gap:.3f}s after attempt {n}, before its wait"
    assert (entry.reason, entry.status, entry.attempts) == ("retries_exhausted", 500, ATTEMPTS)
