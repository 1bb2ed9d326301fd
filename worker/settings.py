"""Configuration, read from the environment only (pydantic-settings).

A vendor is enabled when its credentials are set. Credentials are
:class:`~pydantic.SecretStr` so that a ``repr`` or a log line of the settings
never shows them; :func:`secrets` lists their raw values for scrubbers.

Example::

    >>> from worker.settings import get_settings
    >>> get_settings().event_property_cap
    15
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .redisconf import RedisTarget

#: Broker, limiter state and dead letters all live here by default.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Requests per second per vendor, shared by every worker on every host.
DEFAULT_RATE_LIMIT = 10.0
#: Seconds a request may reach a vendor later than its rate-limit slot (see worker/limits/ratelimit.py).
DEFAULT_RATE_LIMIT_MARGIN = 0.03
#: The same for a delivery thread's first request to a vendor (it opens a connection).
DEFAULT_RATE_LIMIT_COLD_MARGIN = 0.3
#: Most ConveYour identify/segment calls sent as one bulk request; 1 sends each alone.
DEFAULT_CONVEYOUR_BATCH_SIZE = 50
#: Seconds a ConveYour batch waits for more calls after its first one; 0 sends what is there.
DEFAULT_CONVEYOUR_BATCH_MAX_WAIT = 0.05
#: ConveYour blocks event objects with more than 15 key/value pairs.
DEFAULT_EVENT_PROPERTY_CAP = 15
#: First backoff step in seconds; the n-th retry waits up to base * 2**(n-1).
DEFAULT_RETRY_BACKOFF_BASE = 2.0
#: No retry waits longer than this many seconds.
DEFAULT_RETRY_BACKOFF_MAX = 600.0
#: Seconds from a delivery's first failure during which it is retried (24 h), then dead-lettered.
DEFAULT_RETRY_WINDOW = 24 * 3600.0
#: Retryable failures in a row (any worker) that open a vendor's circuit breaker; 0 = no breaker.
DEFAULT_BREAKER_THRESHOLD = 10
#: Longest spacing, in seconds, between probes of an open breaker (the first comes after 1 s, then doubling).
DEFAULT_BREAKER_PROBE_MAX = 15.0
#: 401/403 answers in a row from one vendor (any worker) that pause it: its credentials were refused; 0 = never pause.
DEFAULT_AUTH_FAILURE_THRESHOLD = 3
#: Seconds between probes of a vendor paused for refused credentials (one real delivery each).
DEFAULT_AUTH_PROBE_INTERVAL = 30.0
#: Seconds a delivery thread may wait for rate-limit tokens in all before its message is requeued.
TOKEN_WAIT_MAX = 5.0
#: Seconds past the longest a delivery can take before a message a silent worker held is redelivered.
VISIBILITY_MARGIN = 15.0
#: Seconds for a whole HTTP exchange with a vendor.
DEFAULT_HTTP_TIMEOUT = 10.0
#: Threads per worker process: delivery is I/O-bound, and a thread waits out each vendor answer (128 threads at
#: 100 ms of vendor latency allow 1,280 requests/s, more than one process delivers without latency; 32 allowed 320).
DEFAULT_WORKER_CONCURRENCY = 128
#: In a worker consuming several vendor queues, the share of its threads one vendor's deliveries may hold
#: (half: 64 of 128, so a slow, hung or throttled vendor leaves the others at least 64); 1 = no bulkhead.
DEFAULT_BULKHEAD_SHARE = 0.5
#: Seconds a producer call may wait on Redis before its messages go to the local spool.
DEFAULT_PUBLISH_TIMEOUT = 0.25
#: Where a producer keeps events while Redis is unreachable (/var/tmp survives reboots).
DEFAULT_SPOOL_DIR = "/var/tmp/vendor-delivery-worker/spool"
#: The spool refuses new events (EnqueueError) beyond this many bytes, about 40 000 events.
DEFAULT_SPOOL_MAX_BYTES = 128 * 1024 * 1024
#: Seconds between a worker process's flushes of its metric counts to Redis (a SIGKILL loses at most this).
DEFAULT_METRICS_FLUSH_INTERVAL = 1.0


class Settings(BaseSettings):
    """Every knob of the product; each field is the upper-cased env variable."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    #: Broker, rate-limiter state, retry schedule and dead letters: ``redis://[:password@]host:port/db``; over TLS
    #: ``rediss://host:port/db?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem``; a Sentinel-managed master
    #: ``sentinel://h1:26379,h2:26379,h3:26379/db`` (``sentinels://…?ssl_ca_certs=…`` for TLS to Sentinels and
    #: master). Read in one place, worker/redisconf.py, by every Redis user.
    redis_url: str = DEFAULT_REDIS_URL
    #: With a sentinel:// REDIS_URL: the name the Sentinels monitor the master under (required there).
    redis_sentinel_master: str | None = None
    #: With a sentinel:// REDIS_URL: the Sentinels' own password (requirepass in sentinel.conf), if any; a
    #: password in the URL is the master's.
    redis_sentinel_password: SecretStr | None = None
    #: Prefix of the Redis keys this product owns (rate limits, breakers, retry schedules, per-person order, dead
    #: letters, metrics); the Celery queues are named after the vendors.
    key_prefix: str = "vdw"

    #: ConvertLoop's app id (Basic auth ``app_id:api_key``): set both CONVERTLOOP_APP_ID and CONVERTLOOP_API_KEY,
    #: or neither. ConvertLoop is enabled when they are set.
    convertloop_app_id: SecretStr | None = None
    #: ConvertLoop's API key, with CONVERTLOOP_APP_ID.
    convertloop_api_key: SecretStr | None = None
    #: ConvertLoop's API root (the sandbox's URL in development).
    convertloop_base_url: str = "https://api.convertloop.co/v1"
    #: Requests/second to ConvertLoop, global across every worker on every host, in any 1-second window at the
    #: vendor (the ceiling of the adaptive rate); 0 = unlimited. Set the same on every worker and the exporter.
    convertloop_rate_limit: float = Field(DEFAULT_RATE_LIMIT, ge=0)

    #: Loops' API key (``Bearer``). Loops is enabled when it is set.
    loops_api_key: SecretStr | None = None
    #: Loops' API root (the sandbox's URL in development).
    loops_base_url: str = "https://app.loops.so/api/v1"
    #: Segment name -> Loops mailing list id, e.g. ``{"vip": "cl123"}``. A segment call goes to Loops only with
    #: an entry for each of its names.
    loops_mailing_lists: dict[str, str] = Field(default_factory=dict)
    #: Requests/second to Loops, as CONVERTLOOP_RATE_LIMIT; 0 = unlimited.
    loops_rate_limit: float = Field(DEFAULT_RATE_LIMIT, ge=0)

    #: ConveYour's app key (``x-conveyour-appkey``): set both CONVEYOUR_APPKEY and CONVEYOUR_TOKEN, or neither.
    #: ConveYour is enabled when they are set.
    conveyour_appkey: SecretStr | None = None
    #: ConveYour's token (``x-conveyour-token``), with CONVEYOUR_APPKEY.
    conveyour_token: SecretStr | None = None
    #: ConveYour's API root, one per account, e.g. ``https://acme.conveyour.com/api``; required with the
    #: credentials.
    conveyour_base_url: str | None = None
    #: Requests/second to ConveYour, as CONVERTLOOP_RATE_LIMIT (a batch is one request); 0 = unlimited.
    conveyour_rate_limit: float = Field(DEFAULT_RATE_LIMIT, ge=0)
    #: Seconds a request may reach a vendor later than its rate-limit slot: full load is N requests per
    #: 1 + margin seconds, and never N + 1 in any second. A thread that woke for its slot later than half of
    #: it (checked on Redis' clock just before sending) gives the slot up and takes another.
    rate_limit_margin: float = Field(DEFAULT_RATE_LIMIT_MARGIN, ge=0, lt=1)
    #: The same for a delivery thread's first request to a vendor (it opens a connection).
    rate_limit_cold_margin: float = Field(DEFAULT_RATE_LIMIT_COLD_MARGIN, ge=0, lt=5)
    #: Most ConveYour identify/segment calls in one bulk request; 1 = no batching.
    conveyour_batch_size: int = Field(DEFAULT_CONVEYOUR_BATCH_SIZE, ge=1)
    #: Seconds a ConveYour batch waits for more calls after its first; 0 sends what is there.
    conveyour_batch_max_wait: float = Field(DEFAULT_CONVEYOUR_BATCH_MAX_WAIT, ge=0)

    #: Most properties per event (ConveYour blocks event objects with more than 15), checked by the producer
    #: and again by the worker.
    event_property_cap: int = Field(DEFAULT_EVENT_PROPERTY_CAP, ge=0)

    #: Seconds; the n-th retry waits uniformly up to ``base * 2^(n-1)`` (full jitter).
    retry_backoff_base: float = Field(DEFAULT_RETRY_BACKOFF_BASE, gt=0)
    #: Seconds; no retry waits longer (this also caps a vendor's Retry-After).
    retry_backoff_max: float = Field(DEFAULT_RETRY_BACKOFF_MAX, gt=0)
    #: Optional extra cap on attempts per delivery, the first included (0: none, the window bounds retries).
    retry_max_attempts: int = Field(0, ge=0)
    #: Seconds from a delivery's first failure during which it is retried (24 h); then it is the dead letter
    #: ``retries_exhausted``. A 429 never counts.
    retry_window: float = Field(DEFAULT_RETRY_WINDOW, gt=0)
    #: Retryable failures in a row (5xx, 408, timeouts, connection errors; any worker) that open a vendor's
    #: circuit breaker; 0 = no breaker.
    breaker_threshold: int = Field(DEFAULT_BREAKER_THRESHOLD, ge=0)
    #: Most seconds between probes of an open breaker (the first after 1 s, then doubling).
    breaker_probe_max: float = Field(DEFAULT_BREAKER_PROBE_MAX, gt=0)
    #: 401/403 answers in a row (any worker) after which the vendor is paused until a probe is accepted; 0 = off.
    auth_failure_threshold: int = Field(DEFAULT_AUTH_FAILURE_THRESHOLD, ge=0)
    #: Seconds between probes of a vendor paused because it refused the credentials.
    auth_probe_interval: float = Field(DEFAULT_AUTH_PROBE_INTERVAL, gt=0)
    #: Seconds for one HTTP exchange with a vendor (connecting takes at most 5 of them).
    http_timeout: float = Field(DEFAULT_HTTP_TIMEOUT, gt=0)

    #: Report final failures (dead letters) and credential pauses to Sentry; unset: no Sentry.
    sentry_dsn: SecretStr | None = None
    #: Development only: a producer call with no vendor enabled logs a warning and goes nowhere,
    #: instead of raising ConfigurationError.
    allow_no_vendors: bool = False

    #: Delivery threads per worker process (delivery is I/O-bound: a thread waits out each vendor answer, so
    #: ``c`` threads send at most ``c / latency`` requests a second). The gevent pool takes its greenlets from
    #: ``-c`` (``celery -A worker worker -P gevent -c 200``: slow vendors, docs: Pools).
    worker_concurrency: int = Field(DEFAULT_WORKER_CONCURRENCY, ge=1)
    #: Share of a worker process's threads one vendor's deliveries (messages taken, not yet ended) may hold
    #: when the worker consumes several queues; at it, the worker stops taking that queue until one ends
    #: (the bulkhead). A worker of one queue lets it have every thread. 1 turns it off.
    bulkhead_share: float = Field(DEFAULT_BULKHEAD_SHARE, gt=0, le=1)
    #: Seconds a producer call may wait on Redis before it spools the event.
    publish_timeout: float = Field(DEFAULT_PUBLISH_TIMEOUT, gt=0)
    #: Replicas that must confirm a producer's write (Redis WAIT, within PUBLISH_TIMEOUT) before the call counts
    #: as queued, else the event is spooled too; 0: none. 1 with Sentinel and two replicas: a failover then
    #: cannot lose an acknowledged event.
    publish_wait_replicas: int = Field(0, ge=0)
    #: Spool events on local disk while Redis is unreachable; off means EnqueueError at once.
    spool_enabled: bool = True
    #: The spool directory, one per host (give each container a volume).
    spool_dir: str = DEFAULT_SPOOL_DIR
    #: The spool refuses events (EnqueueError) beyond this many bytes (128 MiB, about 40 000 events).
    spool_max_bytes: int = Field(DEFAULT_SPOOL_MAX_BYTES, ge=0)
    #: Seconds before an unacknowledged message is handed to another worker;
    #: unset: the longest one delivery can take, plus a margin (``Settings.visibility_timeout``),
    #: ``min(HTTP_TIMEOUT, 5) + HTTP_TIMEOUT + 5 + CONVEYOUR_BATCH_MAX_WAIT + 15``: 35 s with the defaults.
    broker_visibility_timeout: float | None = Field(None, gt=0)
    #: Keep each person's calls in order at each vendor, merging waiting updates. Off is only for measuring
    #: what ordering costs (make bench): producers then queue calls without their order.
    ordering: bool = True
    #: Count deliveries, 429s and request durations for ``python -m worker metrics``.
    metrics_enabled: bool = True
    #: Seconds between a worker process's flushes of its metric counts to Redis (a SIGKILLed process loses at
    #: most this much).
    metrics_flush_interval: float = Field(DEFAULT_METRICS_FLUSH_INTERVAL, gt=0)

    @model_validator(mode="after")
    def _redis_target(self) -> Settings:
        self.redis_target()  # raises RedisConfigError (a ValueError) saying what is wrong
        return self

    def redis_target(self) -> RedisTarget:
        """Where Redis is (one server, TLS, or a Sentinel-managed master), for every Redis user."""
        password = self.redis_sentinel_password.get_secret_value() if self.redis_sentinel_password else None
        return RedisTarget.parse(self.redis_url, self.redis_sentinel_master, password)

    @model_validator(mode="after")
    def _complete_credentials(self) -> Settings:
        pairs = {
            "CONVERTLOOP": (self.convertloop_app_id, self.convertloop_api_key),
            "CONVEYOUR": (self.conveyour_appkey, self.conveyour_token),
        }
        for vendor, values in pairs.items():
            if any(values) and not all(values):
                raise ValueError(
                    f"{vendor} credentials are incomplete: set both "
                    + (
                        "CONVERTLOOP_APP_ID and CONVERTLOOP_API_KEY"
                        if vendor == "CONVERTLOOP"
                        else "CONVEYOUR_APPKEY and CONVEYOUR_TOKEN"
                    )
                )
        if all(pairs["CONVEYOUR"]) and not self.conveyour_base_url:
            raise ValueError(
                "CONVEYOUR_BASE_URL must be set when ConveYour credentials are "
                "(e.g. https://acme.conveyour.com/api)"
            )
        return self

    @property
    def visibility_timeout(self) -> float:
        """The longest one delivery holds its message, plus a margin: a dead worker's messages come back
        this soon. Retries wait in Redis, not in a worker, so no countdown needs covering.

        One delivery is at most: connecting (at most 5 s of HTTP_TIMEOUT) and the exchange (HTTP_TIMEOUT),
        its token wait (TOKEN_WAIT_MAX), a ConveYour batch's wait for more calls, and the margin.
        With the defaults: 5 + 10 + 5 + 0.05 + 15 = 35 s.
        """
        if self.broker_visibility_timeout is not None:
            return self.broker_visibility_timeout
        return (min(self.http_timeout, 5.0) + self.http_timeout + TOKEN_WAIT_MAX + self.conveyour_batch_max_wait
                + VISIBILITY_MARGIN)

    def secrets(self) -> list[str]:
        """The raw credential strings, for scrubbing logs, dead letters and Sentry events."""
        values = [
            self.convertloop_app_id,
            self.convertloop_api_key,
            self.loops_api_key,
            self.conveyour_appkey,
            self.conveyour_token,
            self.redis_sentinel_password,
        ]
        out = [v.get_secret_value() for v in values if v and v.get_secret_value()]
        redis_password = self.redis_target().password
        return out + [redis_password] if redis_password else out


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; ``get_settings.cache_clear()`` re-reads."""
    return Settings()
