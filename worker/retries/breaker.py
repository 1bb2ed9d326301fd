"""A circuit breaker per vendor, global across workers: stop sending to a vendor that is down.

After ``threshold`` retryable failures in a row (5xx, 408, timeouts, connection
errors; a 429 is the limiter's business and counts for nothing) the vendor is
*open*: workers stop taking its messages, which wait in its queue with no
attempt spent. One probe at a time (a lease in Redis) sends one real delivery,
first after ``first_probe`` seconds, then at doubling spacing up to
``max_probe`` seconds. Any answer that is not a retryable failure closes the
breaker, and whoever closed it releases everything that waited.

State lives in one Redis hash per vendor; every change is one Lua script on
Redis' clock. Each process keeps a local view, refreshed by its
:class:`~worker.retries.ticker.Ticker` and by its own results, so a healthy
delivery costs no Redis write: only a success after failures writes.

Example::

    >>> b = Breaker(redis.Redis(), "vdw", threshold=10)     # doctest: +SKIP
    >>> b.record("loops", ok=False)                        # doctest: +SKIP
    >>> b.is_open("loops")                                 # doctest: +SKIP
    False
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

CLOSED, OPEN = "closed", "open"
#: Seconds from opening to the first probe.
FIRST_PROBE = 1.0

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: state hash. ARGV: threshold, first probe spacing. Returns {state, failures, 1 if it just opened}.
_FAILURE = _NOW + """
local n = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state ~= 'open' and n >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'since', tostring(now),
             'next_probe', tostring(now + tonumber(ARGV[2])), 'spacing', ARGV[2])
  return {'open', n, 1}
end
return {state, n, 0}
"""

# KEYS: state hash, probe lease. Returns 1 if this call closed an open breaker.
_SUCCESS = _NOW + """
local state = redis.call('HGET', KEYS[1], 'state')
redis.call('HSET', KEYS[1], 'failures', 0)
if state == 'open' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'since', tostring(now))
  redis.call('HDEL', KEYS[1], 'next_probe', 'spacing')
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""

# KEYS: state hash, probe lease. Returns {state, failures, since (Redis time) or '', seconds to next probe or ''}.
_POLL = _NOW + """
local v = redis.call('HMGET', KEYS[1], 'state', 'failures', 'since', 'next_probe')
local state = v[1] or 'closed'
local probe_in = ''
if state == 'open' and v[4] then
  probe_in = tostring(tonumber(v[4]) - now)
  if redis.call('EXISTS', KEYS[2]) == 1 then probe_in = 'busy' end
end
return {state, tonumber(v[2] or '0'), v[3] or '', probe_in, tostring(now)}
"""

# KEYS: state hash, probe lease. ARGV: lease ms, holder. 1 if the caller holds the probe lease now.
_CLAIM_PROBE = _NOW + """
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return 0 end
local due = tonumber(redis.call('HGET', KEYS[1], 'next_probe') or '0')
if now < due then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', tonumber(ARGV[1])) then return 1 end
return 0
"""

# KEYS: state hash, probe lease. ARGV: max spacing, 1 if the probe failed (space the next one further).
_PROBE_DONE = _NOW + """
redis.call('DEL', KEYS[2])
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return 0 end
local spacing = tonumber(redis.call('HGET', KEYS[1], 'spacing') or '1')
if ARGV[2] == '1' then
  spacing = math.min(tonumber(ARGV[1]), math.max(1, spacing * 2))
  redis.call('HSET', KEYS[1], 'spacing', tostring(spacing), 'next_probe', tostring(now + spacing))
end
return 1
"""


@dataclass(frozen=True)
class BreakerState:
    """What :meth:`Breaker.poll` saw: the state, the failures in a row, since when (Redis time, seconds),
    whether a probe may start now, and Redis' clock at the time."""

    state: str
    failures: int
    since: float | None
    probe_due: bool
    now: float

    @property
    def open(self) -> bool:
        return self.state == OPEN


class Breaker:
    """The vendors' breakers under ``<prefix>:breaker:<vendor>``; ``threshold=0`` turns them off."""

    def __init__(self, client: redis.Redis, prefix: str, threshold: int, max_probe: float = 15.0,
                 first_probe: float = FIRST_PROBE) -> None:
        self.prefix = prefix
        self.threshold = threshold
        self.max_probe = max_probe
        self.first_probe = min(first_probe, max_probe)
        self._failure = client.register_script(_FAILURE)
        self._success = client.register_script(_SUCCESS)
        self._poll = client.register_script(_POLL)
        self._claim = client.register_script(_CLAIM_PROBE)
        self._done = client.register_script(_PROBE_DONE)
        self._lock = threading.Lock()
        #: vendor -> (open?, failures in a row) as this process last saw it.
        self._view: dict[str, tuple[bool, int]] = {}

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def _keys(self, vendor: str) -> list[str]:
        key = f"{self.prefix}:breaker:{vendor}"
        return [key, f"{key}:probe"]

    # -- the delivery path ----------------------------------------------------

    def is_open(self, vendor: str) -> bool:
        """Local: did this process last see ``vendor``'s breaker open? No Redis call."""
        return self._view.get(vendor, (False, 0))[0]

    def record(self, vendor: str, ok: bool) -> bool:
        """One request's result: ``ok`` = the vendor answered (not a retryable failure).

        Returns True when this call closed an open breaker (the caller releases what waited).
        A success while the breaker is closed and no failure was seen writes nothing.
        """
        if not self.enabled:
            return False
        is_open, failures = self._view.get(vendor, (False, 0))
        if ok:
            if not is_open and failures == 0:
                return False
            closed = bool(int(self._success(keys=self._keys(vendor))))
            self._set(vendor, False, 0)
            if closed:
                log.warning("%s: circuit breaker closed: the vendor answered again", vendor)
            return closed
        state, n, opened = self._failure(keys=self._keys(vendor)[:1], args=[self.threshold, self.first_probe])
        self._set(vendor, _text(state) == OPEN, int(n))
        if int(opened):
            log.warning("%s: circuit breaker open after %s failures in a row: deliveries wait in the queue; "
                        "probing from %.0fs, at most every %.0fs", vendor, int(n), self.first_probe, self.max_probe)
        return False

    # -- the ticker and the probe ---------------------------------------------

    def poll(self, vendor: str) -> BreakerState:
        """Read the shared state (and refresh this process's view of it)."""
        state, failures, since, probe_in, now = self._poll(keys=self._keys(vendor))
        state, probe_in = _text(state), _text(probe_in)
        self._set(vendor, state == OPEN, int(failures))
        return BreakerState(state, int(failures), float(since) if since else None,
                            probe_in not in ("", "busy") and float(probe_in) <= 0, float(now))

    def claim_probe(self, vendor: str, lease: float, holder: str) -> bool:
        """Take the one probe lease if a probe is due; it expires after ``lease`` seconds if never returned."""
        return bool(int(self._claim(keys=self._keys(vendor), args=[int(lease * 1000), holder])))

    def probe_done(self, vendor: str, failed: bool) -> None:
        """Give the lease back; a failed probe doubles the spacing to the next one (up to ``max_probe``)."""
        self._done(keys=self._keys(vendor), args=[self.max_probe, "1" if failed else "0"])

    def _set(self, vendor: str, is_open: bool, failures: int) -> None:
        with self._lock:
            self._view[vendor] = (is_open, failures)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
