"""Prometheus metrics end to end: real workers deliver known traffic to the sandbox, ``python -m worker metrics``
serves what they counted, and every value is checked from a scrape over HTTP.

Counts are compared as differences from a scrape taken before the traffic (the counters in Redis are global
and live as long as Redis does). Each wait is for a positive signal: the sandbox's request log, the
dead-letter store, the queues and the unacked hash empty, the flushed totals reaching what was sent, a
worker process that has exited.
"""

from __future__ import annotations

import pytest

import worker
from tests.helpers import metric, metric_values, stop_workers, wait_idle
from worker.dev.localstack import MetricsExporterProcess, wait_until
from worker.errors import REASONS
from worker.metrics.schema import BUCKET_LABELS, OUTCOMES
from worker.vendors import VENDORS

pytestmark = pytest.mark.integration

#: Per vendor: (tracks sent, the sandbox's injected failures) and what the metrics must then say.
TRAFFIC = {
    "convertloop": (4, [{"status": 429, "retry_after": 1}]),  # one 429, retried, then delivered
    "loops": (3, [503]),                                       # one 503, retried, then delivered
    "conveyour": (2, [422]),                                   # one rejected: a dead letter
}
EXPECTED = {  # vendor: (delivered, retried, dead_lettered, merged, 429s, requests); one person per call: no merge
    "convertloop": (4, 1, 0, 0, 1, 5),
    "loops": (3, 1, 0, 0, 0, 4),
    "conveyour": (1, 0, 1, 0, 0, 2),
}


@pytest.fixture(scope="module")
def exporter(base_env, tmp_path_factory):
    proc = MetricsExporterProcess(base_env, tmp_path_factory.mktemp("exporter") / "exporter.log").start()
    yield proc
    proc.stop()


def counters(values: dict) -> dict[str, tuple[float, ...]]:
    """Per vendor: (delivered, retried, dead_lettered, merged, 429s, requests) as scraped."""
    return {v: (*(metric(values, "vdw_deliveries_total", vendor=v, outcome=o) for o in OUTCOMES),
                metric(values, "vdw_rate_limited_total", vendor=v),
                metric(values, "vdw_request_duration_seconds_count", vendor=v))
            for v in VENDORS}


def delta(after: dict, before: dict) -> dict:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def duration_sum_range(buckets: list[float]) -> tuple[float, float]:
    """The least and the most the durations counted in cumulative histogram ``buckets`` (one per BUCKET_LABELS
    bound) can add up to: each observation lies between its bucket's lower and upper bound."""
    bounds = [float(le) for le in BUCKET_LABELS]
    counts = [b - a for a, b in zip([0.0, *buckets], buckets, strict=False)]
    low = sum(n * lower for n, lower in zip(counts, [0.0, *bounds], strict=False))
    high = sum(n * upper for n, upper in zip(counts, bounds, strict=True) if n)
    return low, high


@pytest.mark.timeout(600)  # its own waits: about 280 s
def test_known_traffic_from_two_worker_processes_is_counted_exactly(start_worker, exporter, product_env, store,
                                                                   sandbox_client, unique_email):
    workers = [start_worker("metrics-a"), start_worker("metrics-b")]  # two processes: one total in Redis
    try:
        before = metric_values(exporter.scrape())
        for vendor, (_n, failures) in TRAFFIC.items():
            sandbox_client.configure(vendor, fail_next=failures)
        for vendor, (n, _) in TRAFFIC.items():
            for i in range(n):
                worker.track("metrics_test", email=f"{vendor}{i}-{unique_email}", vendors=[vendor])

        for vendor, (delivered, *_rest) in EXPECTED.items():
            sandbox_client.wait_for(delivered, vendor=vendor, timeout=30)
        wait_until(lambda: store.list("conveyour"), timeout=30, message="the ConveYour dead letter")
        wait_idle(product_env["REDIS_URL"])
        seen: list[dict] = []

        def reached() -> bool:
            seen.append(counters(delta(metric_values(exporter.scrape()), before)))
            return seen[-1] == EXPECTED

        try:
            wait_until(reached, timeout=30, interval=0.2, message="the flushed totals")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: expected {EXPECTED}, last scraped {seen[-1]}") from None
    finally:
        stop_workers(workers)
    # A warm shutdown (exit status 0, not a SIGKILL after the stop's timeout): the last flush ran.
    assert [proc.proc.returncode for proc in workers] == [0, 0]

    # The workers are gone (their last counts flushed on the way out): nothing can change the totals now.
    values = metric_values(exporter.scrape())
    counted = delta(values, before)
    assert counters(counted) == EXPECTED, "the shutdown flush counted something twice"
    requests = {v: len(sandbox_client.requests(vendor=v)) for v in VENDORS}
    assert requests == {v: e[-1] for v, e in EXPECTED.items()}, requests

    assert metric(counted, "vdw_dead_letters_total", vendor="conveyour", reason="rejected") == 1
    assert sum(n for (name, _), n in counted.items() if name == "vdw_dead_letters_total") == 1
    for vendor, (*_, n_requests) in EXPECTED.items():
        buckets = [metric(counted, "vdw_request_duration_seconds_bucket", vendor=vendor, le=le) for le in BUCKET_LABELS]
        assert buckets == sorted(buckets) and buckets[-1] == n_requests, (vendor, buckets)
        # The sum agrees with the buckets it was counted with (seconds, not milliseconds): no wall-clock bound.
        took = metric(counted, "vdw_request_duration_seconds_sum", vendor=vendor)
        low, high = duration_sum_range(buckets)
        assert 0 < took and low <= took <= high, (vendor, took, buckets)

    # Gauges, live: nothing queued, held or waiting; breakers closed; the one stored dead letter.
    for vendor in VENDORS:
        for gauge in ("vdw_queue_depth", "vdw_in_flight", "vdw_retries_waiting", "vdw_breaker_open"):
            assert metric(values, gauge, vendor=vendor) == 0, (gauge, vendor)
        assert metric(values, "vdw_effective_rate", vendor=vendor) is None  # the tests run unlimited
        assert metric(values, "vdw_configured_rate", vendor=vendor) is None
        for reason in REASONS:
            stored = 1 if (vendor, reason) == ("conveyour", "rejected") else 0
            assert metric(values, "vdw_dead_letters_stored", vendor=vendor, reason=reason) == stored
    assert metric(values, "vdw_redis_up") == 1


def test_a_clean_shutdown_flushes_what_the_interval_has_not(start_worker, exporter, product_env, sandbox_client,
                                                            unique_email):
    """With an hour between flushes only the shutdown flush can bring the counts to Redis."""
    w = start_worker("metrics-slow-flush", METRICS_FLUSH_INTERVAL="3600")
    try:
        before = metric_values(exporter.scrape())
        for i in range(2):
            worker.track("metrics_test", email=f"{i}-{unique_email}", vendors=["loops"])
        sandbox_client.wait_for(2, vendor="loops", timeout=30)
        wait_idle(product_env["REDIS_URL"])
        # Delivered and acknowledged, and the first flush is an hour away: still nothing in Redis.
        assert metric(delta(metric_values(exporter.scrape()), before), "vdw_deliveries_total",
                      vendor="loops", outcome="delivered") == 0
    finally:
        w.stop()
    assert w.proc.returncode == 0, "not a warm shutdown: the shutdown flush did not run"
    counted = delta(metric_values(exporter.scrape()), before)
    assert metric(counted, "vdw_deliveries_total", vendor="loops", outcome="delivered") == 2
    assert metric(counted, "vdw_request_duration_seconds_count", vendor="loops") == 2
