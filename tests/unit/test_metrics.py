"""worker.metrics: the in-process counts, their flush to the test Redis, the pipeline's calls, the collector."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client import generate_latest

from tests.helpers import metric, metric_values
from tests.vendormock import vendor_http
from worker.clients import VendorHTTP
from worker.delivery.pipeline import Pipeline, RetryLater
from worker.dev.localstack import free_port
from worker.errors import DeadLettered
from worker.limits.ratelimit import Unlimited
from worker.limits.throttle import Throttle
from worker.metrics import DEAD_LETTERED, DELIVERED, RETRIED
from worker.metrics.collect import Flusher, Recorder
from worker.metrics.schema import BUCKET_LABELS, counters_key
from worker.ops.export import FAMILIES, VendorCollector, exposed_names
from worker.settings import Settings
from worker.vendors import VENDORS

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


BASE = "https://vendor.test"


def track(n_props: int = 1) -> dict:
    return {"id": "ev1", "operation": "track", "created_at": "2026-01-01T00:00:00Z", "identity": {"email": "j@a.co"},
            "event": "sale", "properties": {f"p{i}": i for i in range(n_props)}, "occurred_at": None}


def test_counts_add_up_per_vendor_outcome_and_reason_and_unknown_labels_are_folded():
    r = Recorder()
    for outcome in (DELIVERED, DELIVERED, RETRIED):
        r.record("loops", outcome)
    r.record("conveyour", DEAD_LETTERED, "rejected")
    r.record("jill@acme.co", DEAD_LETTERED, "some text from a message")  # never a label value
    assert r.pending() == {"deliveries|loops|delivered": 2, "deliveries|loops|retried": 1,
                           "deliveries|conveyour|dead_lettered": 1, "dead_letters|conveyour|rejected": 1,
                           "deliveries|unknown|dead_lettered": 1, "dead_letters|unknown|unknown": 1}
    with pytest.raises(ValueError):
        r.record("loops", "lost")


def test_request_durations_fall_in_one_bucket_each_and_429s_are_counted():
    r = Recorder()
    r.request("loops", 0.004, 200)
    r.request("loops", 0.3, 429)
    r.request("loops", 60.0, None)  # beyond the last bound: +Inf
    assert r.pending() == {"request_duration|loops|le|0.005": 1, "request_duration|loops|le|0.5": 1,
                           "request_duration|loops|le|+Inf": 1, "rate_limited|loops": 1,
                           "request_duration|loops|sum": pytest.approx(60.304)}


def test_a_disabled_recorder_counts_nothing():
    r = Recorder(enabled=False)
    r.record("loops", DELIVERED)
    r.request("loops", 0.1, 429)
    assert r.pending() == {}


def test_a_flush_adds_to_redis_and_starts_again_from_zero(client, prefix):
    r = Recorder()
    for _ in range(2):
        r.record("loops", DELIVERED)
        r.request("loops", 0.25, 200)
        assert r.flush(client, prefix)
        assert r.pending() == {}
    stored = {k.decode(): v.decode() for k, v in client.hgetall(counters_key(prefix)).items()}
    assert stored == {"deliveries|loops|delivered": "2", "request_duration|loops|le|0.25": "2",
                      "request_duration|loops|sum": "0.5"}


def test_a_failed_flush_keeps_its_counts_for_the_next_one(client, prefix):
    r = Recorder()
    r.record("loops", DELIVERED)
    away = _nowhere()
    assert not r.flush(away, prefix)
    r.record("loops", DELIVERED)
    assert r.pending() == {"deliveries|loops|delivered": 2}
    assert r.flush(client, prefix)
    assert client.hget(counters_key(prefix), "deliveries|loops|delivered") == b"2"


def test_the_flusher_stops_with_a_last_flush(client, prefix):
    r = Recorder()
    f = Flusher(r, lambda: client, prefix, interval=3600)
    f.start()
    r.record("loops", RETRIED)
    assert f.stop()
    assert not f.is_alive()
    assert client.hget(counters_key(prefix), "deliveries|loops|retried") == b"1"


@pytest.fixture
def recorded(store):
    """A pipeline to mocked Loops and ConveYour that records into a fresh Recorder."""
    settings = Settings(_env_file=None, loops_api_key="k", loops_base_url=f"{BASE}/loops", conveyour_appkey="a",
                        conveyour_token="t", conveyour_base_url=f"{BASE}/cy", conveyour_batch_size=1,
                        retry_max_attempts=3)
    recorder = Recorder()
    with VendorHTTP() as http:
        pipeline = Pipeline(settings, http, store, {v: Unlimited() for v in VENDORS}, Throttle(), recorder=recorder)
        yield pipeline, recorder


@vendor_http
def test_the_pipeline_records_each_outcome_its_requests_and_429s(recorded):
    pipeline, recorder = recorded
    vendor_http.post(f"{BASE}/loops/events/send").mock(side_effect=[
        httpx.Response(200, json={"success": True}),
        httpx.Response(429, headers={"Retry-After": "1"}),
        httpx.Response(503),
    ])
    vendor_http.post(f"{BASE}/cy/analytics/track").mock(return_value=httpx.Response(422, json={"message": "bad"}))
    pipeline.deliver("loops", track(), attempt=1)
    assert isinstance(pipeline.deliver("loops", track(), attempt=1), RetryLater)
    assert isinstance(pipeline.deliver("loops", track(), attempt=1), RetryLater)
    with pytest.raises(DeadLettered):
        pipeline.deliver("conveyour", track(), attempt=1)
    with pytest.raises(DeadLettered):  # over EVENT_PROPERTY_CAP: no request at all
        pipeline.deliver("loops", track(n_props=40), attempt=1)
    counts = recorder.pending()
    assert {k: v for k, v in counts.items() if not k.startswith("request_duration")} == {
        "deliveries|loops|delivered": 1, "deliveries|loops|retried": 2, "rate_limited|loops": 1,
        "deliveries|conveyour|dead_lettered": 1, "dead_letters|conveyour|rejected": 1,
        "deliveries|loops|dead_lettered": 1, "dead_letters|loops|property_cap": 1}
    requests = {vendor: sum(n for k, n in counts.items() if k.startswith(f"request_duration|{vendor}|le|"))
                for vendor in ("loops", "conveyour")}
    assert requests == {"loops": 3, "conveyour": 1}


def _nowhere() -> redis.Redis:
    """A client of a port nobody listens on, that gives up at once (redis-py retries 3 times by default)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


def _scrape(collector: VendorCollector) -> dict:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(collector)
    return metric_values(generate_latest(registry).decode())


def test_the_collector_turns_stored_counts_into_counters_and_a_cumulative_histogram(client, prefix, tmp_path):
    r = Recorder()
    r.record("loops", DELIVERED)
    r.record("loops", DEAD_LETTERED, "rejected")
    for seconds in (0.004, 0.02, 0.02, 3.0):
        r.request("loops", seconds, 429 if seconds == 3.0 else 200)
    assert r.flush(client, prefix)
    settings = Settings(_env_file=None, key_prefix=prefix, spool_dir=str(tmp_path))
    status = {"vendors": {}, "spool": {"events": 0, "bytes": 0}}
    values = _scrape(VendorCollector(client=lambda: client, settings=lambda: settings, status=lambda: status))

    assert metric(values, "vdw_deliveries_total", vendor="loops", outcome="delivered") == 1
    assert metric(values, "vdw_deliveries_total", vendor="convertloop", outcome="retried") == 0  # present from 0
    assert metric(values, "vdw_dead_letters_total", vendor="loops", reason="rejected") == 1
    assert metric(values, "vdw_rate_limited_total", vendor="loops") == 1
    cumulative = [metric(values, "vdw_request_duration_seconds_bucket", vendor="loops", le=le) for le in BUCKET_LABELS]
    assert cumulative == [1, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4]
    assert metric(values, "vdw_request_duration_seconds_count", vendor="loops") == 4
    assert metric(values, "vdw_request_duration_seconds_sum", vendor="loops") == pytest.approx(3.044)
    assert metric(values, "vdw_redis_up") == 1


def test_with_redis_away_a_scrape_says_so_and_still_shows_the_spool(tmp_path):
    away = _nowhere()
    settings = Settings(_env_file=None, spool_dir=str(tmp_path))
    values = _scrape(VendorCollector(client=lambda: away, settings=lambda: settings))
    assert values == {("vdw_redis_up", ()): 0, ("vdw_spool_events", ()): 0, ("vdw_spool_bytes", ()): 0}


def test_the_collector_declares_every_family_it_serves():
    declared = {m.name for m in VendorCollector(client=lambda: None).describe()}
    assert declared == set(FAMILIES)
    assert "vdw_deliveries_total" in exposed_names() and "vdw_request_duration_seconds_bucket" in exposed_names()


def test_the_operations_page_lists_every_metric():
    text = OPERATIONS.read_text()
    section = text[text.index("## Metrics"):]
    section = section[:section.index("\n## ", 1)]
    listed = set(re.findall(r"`(vdw_[a-z_]+)", section))
    shown = {name + ("_total" if kind == "counter" else "") for name, (kind, _, _) in FAMILIES.items()}
    assert shown <= listed, f"missing from docs/operations.md's Metrics section: {sorted(shown - listed)}"
