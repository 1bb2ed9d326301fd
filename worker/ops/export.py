"""``python -m worker metrics``: one exporter serving ``/metrics`` to Prometheus, for every worker on every host.

A :class:`VendorCollector` (a prometheus_client custom collector) answers each scrape:

- counters and the request-duration histogram: the totals every worker process
  flushed to Redis (:mod:`worker.metrics.collect`; one HGETALL);
- gauges, read live: what ``python -m worker status`` shows
  (:func:`worker.ops.cli.vendor_status`: queue lengths, messages workers hold,
  waiting retries, breakers and pauses for refused credentials, rates, stored
  dead letters, from their counts), Redis' memory (``INFO memory``: used and
  ``maxmemory``, 0 when unlimited) and the spool in
  ``SPOOL_DIR`` on the exporter's own host;
- ``vdw_redis_up``: 0 when Redis did not answer (then only the spool is shown).

Run one exporter per deployment (the totals are global; several exporters show
the same numbers), or one per web host to see each host's spool.

Example::

    $ python -m worker metrics --port 9808 --host 127.0.0.1
    $ curl -s http://127.0.0.1:9808/metrics | grep '^vdw_deliveries_total'
    vdw_deliveries_total{outcome="delivered",vendor="loops"} 1234.0
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .. import clients
from ..errors import REASONS
from ..metrics.schema import (
    BUCKET_LABELS,
    DEAD_LETTERS,
    DELIVERIES,
    OUTCOMES,
    RATE_LIMITED,
    REQUEST_DURATION,
    SEP,
    counters_key,
)
from ..settings import Settings, get_settings
from ..vendors import VENDORS
from .status import vendor_status

log = logging.getLogger(__name__)

#: The exporter's port unless ``--port`` says otherwise.
DEFAULT_PORT = 9808
DEFAULT_HOST = "127.0.0.1"

V, VR, VO = ["vendor"], ["vendor", "reason"], ["vendor", "outcome"]

#: name (as in the exposition; a counter's without ``_total``) -> (type, help, labels).
FAMILIES: dict[str, tuple[str, str, list[str]]] = {
    "vdw_deliveries": ("counter", "Delivery attempts ended, by outcome: delivered, retried (a 429 included), "
                                  "dead_lettered, merged (delivered inside another call's request).", VO),
    "vdw_dead_letters": ("counter", "Deliveries dead-lettered, by reason.", VR),
    "vdw_rate_limited": ("counter", "Requests the vendor answered 429 (Too Many Requests).", V),
    "vdw_request_duration_seconds": ("histogram", "Seconds one HTTP exchange with the vendor took "
                                                  "(timeouts and network errors included).", V),
    "vdw_queue_depth": ("gauge", "Deliveries waiting in the vendor's queue (the Redis list).", V),
    "vdw_in_flight": ("gauge", "Deliveries a worker holds now (taken from the queue, not yet acknowledged).", V),
    "vdw_retries_waiting": ("gauge", "Deliveries waiting in Redis for their next attempt.", V),
    "vdw_people_held": ("gauge", "People whose later calls wait behind an earlier call of theirs (delivering or "
                                 "waiting to retry) at the vendor.", V),
    "vdw_breaker_open": ("gauge", "1 while the vendor's circuit breaker is open, else 0.", V),
    "vdw_vendor_auth_failed": ("gauge", "1 while the vendor is paused because it refuses the credentials "
                                        "(401/403 in a row; its deliveries wait in the queue), else 0.", V),
    "vdw_effective_rate": ("gauge", "Requests/second every worker allows the vendor now (adaptive; "
                                    "absent when unlimited).", V),
    "vdw_configured_rate": ("gauge", "The vendor's configured rate limit, requests/second (absent when "
                                     "unlimited; from the exporter's environment).", V),
    "vdw_dead_letters_stored": ("gauge", "Dead letters stored now (until replayed or purged), by reason.", VR),
    "vdw_spool_events": ("gauge", "Events a producer on this host keeps in SPOOL_DIR until Redis takes them.", []),
    "vdw_spool_bytes": ("gauge", "Bytes of SPOOL_DIR on this host.", []),
    "vdw_redis_up": ("gauge", "1 if Redis answered this scrape, else 0.", []),
    "vdw_redis_memory_used_bytes": ("gauge", "Bytes Redis uses (INFO memory used_memory).", []),
    "vdw_redis_memory_max_bytes": ("gauge", "Redis' maxmemory in bytes (0: unlimited). At maxmemory with "
                                            "noeviction Redis refuses new events.", []),
}

_TYPES = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
#: The families of one scrape by name, each of its FAMILIES type: a counter's, a gauge's and a histogram's
#: ``add_metric`` take different arguments, so the values are typed Any.
Families = dict[str, Any]


def exposed_names() -> set[str]:
    """Every sample name a scrape can show (``vdw_deliveries_total``, ``..._bucket``, ...)."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {name + s for name, (kind, _, _) in FAMILIES.items() for s in suffixes[kind]}


class VendorCollector(Collector):
    """Builds every family at scrape time from Redis and the local spool."""

    def __init__(self, client: Callable[[], redis.Redis] | None = None,
                 settings: Callable[[], Settings] = get_settings,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.client = client or clients.redis_client
        self.settings = settings
        self.status = status or vendor_status

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        s = self.settings()
        families = self._families()
        try:
            counts = self.client().hgetall(counters_key(s.key_prefix))
            status = self.status()
        except redis.RedisError as exc:
            log.warning("metrics: Redis did not answer: %s", exc)
            families["vdw_redis_up"].add_metric([], 0)
            self._spool(families, _spool_only(s))
            return iter([f for f in families.values() if f.samples])
        families["vdw_redis_up"].add_metric([], 1)
        self._counters(families, {_text(k): _text(v) for k, v in counts.items()})
        self._gauges(families, status)
        self._spool(families, status["spool"])
        return iter(families.values())

    # -- building -------------------------------------------------------------

    @staticmethod
    def _families() -> Families:
        return {name: _TYPES[kind](name, doc, labels=labels) for name, (kind, doc, labels) in FAMILIES.items()}

    @staticmethod
    def _counters(families: Families, counts: dict[str, str]) -> None:
        deliveries = {(v, o): 0.0 for v in VENDORS for o in OUTCOMES}
        dead = {(v, r): 0.0 for v in VENDORS for r in REASONS}
        limited = {v: 0.0 for v in VENDORS}
        buckets: dict[str, dict[str, float]] = {v: {} for v in VENDORS}
        sums = {v: 0.0 for v in VENDORS}
        for name, value in counts.items():
            family, vendor, *rest = name.split(SEP)
            if family == DELIVERIES and len(rest) == 1:
                deliveries[vendor, rest[0]] = float(value)
            elif family == DEAD_LETTERS and len(rest) == 1:
                dead[vendor, rest[0]] = float(value)
            elif family == RATE_LIMITED and not rest:
                limited[vendor] = float(value)
            elif family == REQUEST_DURATION and rest == ["sum"]:
                sums[vendor] = float(value)
            elif family == REQUEST_DURATION and len(rest) == 2 and rest[0] == "le":
                buckets.setdefault(vendor, {})[rest[1]] = float(value)
        for (vendor, outcome), n in sorted(deliveries.items()):
            families["vdw_deliveries"].add_metric([vendor, outcome], n)
        for (vendor, reason), n in sorted(dead.items()):
            families["vdw_dead_letters"].add_metric([vendor, reason], n)
        for vendor, n in sorted(limited.items()):
            families["vdw_rate_limited"].add_metric([vendor], n)
        for vendor, per_bucket in sorted(buckets.items()):
            cumulative, running = [], 0.0
            for le in BUCKET_LABELS:
                running += per_bucket.get(le, 0.0)
                cumulative.append((le, running))
            families["vdw_request_duration_seconds"].add_metric([vendor], cumulative, sums.get(vendor, 0.0))

    @staticmethod
    def _gauges(families: Families, status: dict[str, Any]) -> None:
        for vendor, v in status["vendors"].items():
            families["vdw_queue_depth"].add_metric([vendor], v["queued"])
            families["vdw_in_flight"].add_metric([vendor], v["in_flight"])
            families["vdw_retries_waiting"].add_metric([vendor], v["retries_waiting"])
            families["vdw_people_held"].add_metric([vendor], v["people_held"])
            families["vdw_breaker_open"].add_metric([vendor], 1 if v["breaker"] == "open" else 0)
            families["vdw_vendor_auth_failed"].add_metric([vendor], 1 if v["auth_failed"] else 0)
            if v["rate_limit"] is not None:  # None: unlimited
                families["vdw_configured_rate"].add_metric([vendor], v["rate_limit"])
                families["vdw_effective_rate"].add_metric([vendor], v["effective_rate"])
            for reason in sorted({*REASONS, *v["dead_letters"]}):
                families["vdw_dead_letters_stored"].add_metric([vendor, reason], v["dead_letters"].get(reason, 0))
        redis_memory = status.get("redis") or {}
        if redis_memory.get("used_memory") is not None:  # None: INFO refused
            families["vdw_redis_memory_used_bytes"].add_metric([], redis_memory["used_memory"])
            families["vdw_redis_memory_max_bytes"].add_metric([], redis_memory["maxmemory"])

    @staticmethod
    def _spool(families: Families, spool: dict[str, Any]) -> None:
        families["vdw_spool_events"].add_metric([], spool["events"])
        families["vdw_spool_bytes"].add_metric([], spool["bytes"])


def _spool_only(s: Settings) -> dict[str, Any]:
    from ..producer.spool import Spool

    spool = Spool(s.spool_dir, s.spool_max_bytes)
    return {"events": spool.pending(), "bytes": spool.size()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def registry() -> CollectorRegistry:
    """A registry with just this product's collector (no process or GC metrics of the exporter itself)."""
    reg = CollectorRegistry()
    reg.register(VendorCollector())
    return reg


def serve(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, stop: threading.Event | None = None) -> None:
    """Serve ``/metrics`` on ``host:port`` until SIGTERM or SIGINT (or ``stop`` is set)."""
    stop = stop or threading.Event()
    server, thread = start_http_server(port, addr=host, registry=registry())
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    print(f"serving metrics on http://{host}:{server.server_port}/metrics", flush=True)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
