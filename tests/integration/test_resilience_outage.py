"""A vendor outage loses nothing and does not hold up the healthy vendors.

Phase A runs without an outage, phase B while ConveYour answers 503 to everything. The healthy vendors
deliver every phase-B event while ConveYour is still down (its breaker open), before ConveYour accepts any of
them, and never more than their limit in any second. Their delivery rates in both phases are printed, not
asserted on: a rate depends on how busy the machine is.
"""

from __future__ import annotations

import pytest

import worker
from tests.helpers import breaker_open, max_in_window
from tests.helpers import email_of as _email
from worker.delivery.deadletters import DeadLetterStore
from worker.dev.localstack import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE = 20  # requests/second the worker allows each vendor
N = 80  # events per phase
HEALTHY = ("convertloop", "loops")


@pytest.mark.timeout(600)  # its own waits: about 290 s
def test_outage_of_one_vendor_loses_nothing_and_keeps_the_others_at_their_rate(start_worker, product_env,
                                                                                 sandbox_client, unique_email):
    start_worker("outage-w", CONVERTLOOP_RATE_LIMIT=RATE, LOOPS_RATE_LIMIT=RATE, CONVEYOUR_RATE_LIMIT=RATE,
                   RETRY_MAX_ATTEMPTS=1000, RETRY_BACKOFF_BASE=0.2, RETRY_BACKOFF_MAX=1)
    sandbox_client.configure("*", latency_ms=20)

    def delivered(vendor: str, phase: str) -> list[dict]:
        return [r for r in sandbox_client.requests(vendor=vendor, status=200)
                if f"{phase}-" in (_email(vendor, r["body"]) or "") and unique_email in str(r["body"])]

    def run_phase(phase: str) -> dict[str, float]:
        for i in range(N):
            worker.track("page", email=f"{phase}-{i}-{unique_email}", properties={"i": i})
        for vendor in HEALTHY:
            wait_until(lambda v=vendor: len(delivered(v, phase)) >= N, timeout=N / RATE * 3 + 30, interval=0.1,
                       message=f"{N} {phase} deliveries at {vendor}")
        rates = {}
        for vendor in HEALTHY:
            times = sorted(r["ts"] for r in delivered(vendor, phase))
            rates[vendor] = (len(times) - 1) / (times[-1] - times[0])
        return rates

    # Phase A: everything healthy.
    before = run_phase("a")
    wait_until(lambda: len(delivered("conveyour", "a")) >= N, timeout=30, message="ConveYour in phase A")

    # Phase B: ConveYour down for the whole phase.
    sandbox_client.configure("conveyour", fail_all=503)
    during = run_phase("b")
    failed = [r for r in sandbox_client.requests(vendor="conveyour", status=503) if unique_email in str(r["body"])]
    reached_during = len(delivered("conveyour", "b"))
    opened = breaker_open("conveyour")

    # Recovery: everything ConveYour missed arrives.
    sandbox_client.configure("conveyour", fail_all=None)
    wait_until(lambda: len({_email("conveyour", r["body"]) for r in delivered("conveyour", "b")}) >= N, timeout=60,
               interval=0.2, message="every phase-B event at ConveYour after the outage")
    print(f"\nhealthy vendors' delivered/s (limit {RATE}/s): without outage {_fmt(before)}, "
          f"with ConveYour down {_fmt(during)}; ConveYour: {len(failed)} attempts answered 503, "
          f"{reached_during} delivered during the outage, all {N} after it")
    # Really down: failures in a row opened its circuit breaker, which then kept the attempts few.
    assert len(failed) >= 10 and opened, "ConveYour was not really down"
    assert len(failed) <= N, "the breaker did not stop the attempts"
    assert reached_during == 0
    cy_first = min(r["ts"] for r in delivered("conveyour", "b"))
    for vendor in HEALTHY:
        # Not held up: every phase-B event reached the healthy vendor while ConveYour was down (the waits above
        # ended before the outage did), i.e. before ConveYour accepted any phase-B event.
        assert max(r["ts"] for r in delivered(vendor, "b")) < cy_first, f"{vendor} waited for ConveYour"
        for phase in ("a", "b"):
            # The limiter's property (the sandbox's timestamps: one more tolerated, as test_rate_limits).
            times = [r["ts"] for r in delivered(vendor, phase)]
            assert max_in_window(times) <= RATE + 1, f"{vendor} went faster than its limit in phase {phase}"
    for vendor in ("convertloop", "loops", "conveyour"):
        for phase in ("a", "b"):
            got = {_email(vendor, r["body"]) for r in delivered(vendor, phase)}
            assert got == {f"{phase}-{i}-{unique_email}" for i in range(N)}, f"{vendor} lost {phase} events"
    assert not [d for d in DeadLetterStore.default().list() if unique_email in str(d.event)]


def _fmt(rates: dict[str, float]) -> str:
    return ", ".join(f"{v} {r:.1f}" for v, r in rates.items())
