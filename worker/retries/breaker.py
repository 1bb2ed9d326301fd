"""A circuit breaker per vendor, global across workers: stop sending to a vendor that is down.

After ``threshold`` retryable failures in a row (5xx, 408, timeouts, connection
errors; a 429 is the limiter's business and counts for nothing) the vendor is
*open*: workers stop taking its messages, which wait in its queue with no
attempt spent. One probe at a time (a lease in Redis) sends one real delivery,
first after ``first_probe`` seconds, then at doubling spacing up to
``max_probe`` seconds. Any answer that is not a retryable failure (nor, with
the pause below on, a 401/403) closes the breaker, and whoever closed it
releases everything that waited.

A second kind of open state, ``auth_failed``, is for a vendor that refuses
the credentials: after ``auth_threshold`` answers 401/403 in a row (any worker;
only an answer that is neither 401/403 nor a retryable failure ends the run) the
vendor is paused the same way -- workers stop taking its queue, nothing is
spent -- and probed with one real delivery every ``auth_interval`` seconds
(no doubling). A probe the vendor accepts (any answer but 401/403 or a
retryable failure) ends the pause like it closes an open breaker.

State lives in one Redis hash per vendor; every change is one Lua script on
Redis' clock. Each process keeps a local view, refreshed by its
:class:`~worker.broker.ticker.Ticker` and by its own results, so a healthy
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
#: Open because the vendor refused the credentials (401/403 in a row), not because it failed.
AUTH_FAILED = "auth_failed"
#: The states in which workers do not take the vendor's queue.
HELD_STATES = (OPEN, AUTH_FAILED)
#: Seconds from opening to the first probe.
FIRST_PROBE = 1.0

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: state hash. ARGV: threshold, first probe spacing.
# Returns {state, failures, 1 if it just opened, auth failures}. Only a closed breaker opens: a vendor paused for
# its credentials stays paused (a retryable failure says nothing about the key).
_FAILURE = _NOW + """
local n = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local auth = tonumber(redis.call('HGET', KEYS[1], 'auth_failures') or '0')
if state == 'closed' and n >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'since', tostring(now),
             'next_probe', tostring(now + tonumber(ARGV[2])), 'spacing', ARGV[2])
  return {'open', n, 1, auth}
end
return {state, n, 0, auth}
"""

# KEYS: state hash. ARGV: auth threshold, probe interval. A 401/403: the vendor answered (a run of retryable
# failures ends) but refused the credentials. Returns {state, auth failures, 1 if this answer paused the vendor}.
_AUTH_FAILURE = _NOW + """
local n = redis.call('HINCRBY', KEYS[1], 'auth_failures', 1)
redis.call('HSET', KEYS[1], 'failures', 0)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state ~= 'auth_failed' and n >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', 'auth_failed', 'since', tostring(now),
             'next_probe', tostring(now + tonumber(ARGV[2])), 'spacing', ARGV[2])
  return {'auth_failed', n, 1}
end
return {state, n, 0}
"""

# KEYS: state hash, probe lease. Returns the state it closed ('open' or 'auth_failed'), or '' if it was closed.
_SUCCESS = _NOW + """
local state = redis.call('HGET', KEYS[1], 'state')
redis.call('HSET', KEYS[1], 'failures', 0, 'auth_failures', 0)
if state == 'open' or state == 'auth_failed' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'since', tostring(now))
  redis.call('HDEL', KEYS[1], 'next_probe', 'spacing')
  redis.call('DEL', KEYS[2])
  return state
end
return ''
"""

# KEYS: state hash, probe lease.
# Returns {state, failures, since (Redis time) or '', seconds to next probe or '' or 'busy', now, auth failures}.
_POLL = _NOW + """
local v = redis.call('HMGET', KEYS[1], 'state', 'failures', 'since', 'next_probe', 'auth_failures')
local state = v[1] or 'closed'
local probe_in = ''
if (state == 'open' or state == 'auth_failed') and v[4] then
  probe_in = tostring(tonumber(v[4]) - now)
  if redis.call('EXISTS', KEYS[2]) == 1 then probe_in = 'busy' end
end
return {state, tonumber(v[2] or '0'), v[3] or '', probe_in, tostring(now), tonumber(v[5] or '0')}
"""

# KEYS: state hash, probe lease. ARGV: lease ms, holder. 1 if the caller holds the probe lease now.
_CLAIM_PROBE = _NOW + """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'open' and state ~= 'auth_failed' then return 0 end
local due = tonumber(redis.call('HGET', KEYS[1], 'next_probe') or '0')
if now < due then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', tonumber(ARGV[1])) then return 1 end
return 0
"""

# KEYS: state hash, probe lease. ARGV: max spacing, 1 if the probe failed (space the next one further).
# Paused for the credentials, the spacing stays what it was set to when the pause began.
_PROBE_DONE = _NOW + """
redis.call('DEL', KEYS[2])
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'open' and state ~= 'auth_failed' then return 0 end
local spacing = tonumber(redis.call('HGET', KEYS[1], 'spacing') or '1')
if ARGV[2] == '1' then
  if state == 'open' then spacing = math.min(tonumber(ARGV[1]), math.max(1, spacing * 2)) end
  redis.call('HSET', KEYS[1], 'spacing', tostring(spacing), 'next_probe', tostring(now + spacing))
end
return 1
"""


@dataclass(frozen=True)
class BreakerState:
    """What :meth:`Breaker.poll` saw: the state, the failures in a row, since when (Redis time, seconds),
    whether a probe may start now, Redis' clock at the time, and the answers 401/403 in a row."""

    state: str
    failures: int
    since: float | None
    probe_due: bool
    now: float
    auth_failures: int = 0

    @property
    def open(self) -> bool:
        """Workers do not take the vendor's queue: open, or paused because it refused the credentials."""
        return self.state in HELD_STATES

    @property
    def auth_failed(self) -> bool:
        return self.state == AUTH_FAILED


@dataclass(frozen=True)
class AuthRefusal:
    """What one answer 401/403 did: whether the vendor is paused now, whether this answer paused it (exactly
    one answer per pause, across all workers, says so), and the 401/403 answers in a row."""

    paused: bool
    paused_now: bool
    in_a_row: int


class Breaker:
    """The vendors' breakers under ``<prefix>:breaker:<vendor>``; ``threshold=0`` turns the failure breaker off,
    ``auth_threshold=0`` the pause for refused credentials."""

    def __init__(self, client: redis.Redis, prefix: str, threshold: int, max_probe: float = 15.0,
                 first_probe: float = FIRST_PROBE, auth_threshold: int = 0, auth_interval: float = 30.0) -> None:
        self.prefix = prefix
        self.threshold = threshold
        self.max_probe = max_probe
        self.first_probe = min(first_probe, max_probe)
        self.auth_threshold = auth_threshold
        self.auth_interval = auth_interval
        self._failure = client.register_script(_FAILURE)
        self._auth_failure = client.register_script(_AUTH_FAILURE)
        self._success = client.register_script(_SUCCESS)
        self._poll = client.register_script(_POLL)
        self._claim = client.register_script(_CLAIM_PROBE)
        self._done = client.register_script(_PROBE_DONE)
        self._lock = threading.Lock()
        #: vendor -> (held?, failures in a row, answers 401/403 in a row) as this process last saw it.
        self._view: dict[str, tuple[bool, int, int]] = {}

    @property
    def enabled(self) -> bool:
        """Either kind of open state can happen (the ticker follows the state only then)."""
        return self.threshold > 0 or self.auth_enabled

    @property
    def auth_enabled(self) -> bool:
        return self.auth_threshold > 0

    def _keys(self, vendor: str) -> list[str]:
        key = f"{self.prefix}:breaker:{vendor}"
        return [key, f"{key}:probe"]

    # -- the delivery path ----------------------------------------------------

    def is_open(self, vendor: str) -> bool:
        """Local: did this process last see ``vendor`` open (or paused for its credentials)? No Redis call."""
        return self._view.get(vendor, (False, 0, 0))[0]

    def record(self, vendor: str, ok: bool) -> bool:
        """One request's result: ``ok`` = the vendor answered (not a retryable failure, not a 401/403 while the
        pause for refused credentials is on: see :meth:`record_auth_failure`).

        Returns True when this call closed an open breaker or ended a pause (the caller releases what waited).
        A success while the breaker is closed and no failure was seen writes nothing.
        """
        if not self.enabled:
            return False
        is_open, failures, auth_failures = self._view.get(vendor, (False, 0, 0))
        if ok:
            if not is_open and failures == 0 and auth_failures == 0:
                return False
            closed = _text(self._success(keys=self._keys(vendor)))
            self._set(vendor, False, 0, 0)
            if closed == OPEN:
                log.warning("%s: circuit breaker closed: the vendor answered again", vendor)
            elif closed == AUTH_FAILED:
                log.warning("%s: the vendor accepted the credentials again: deliveries resume", vendor)
            return bool(closed)
        if self.threshold <= 0:
            return False
        state, n, opened, auth = self._failure(keys=self._keys(vendor)[:1], args=[self.threshold, self.first_probe])
        self._set(vendor, _text(state) in HELD_STATES, int(n), int(auth))
        if int(opened):
            log.warning("%s: circuit breaker open after %s failures in a row: deliveries wait in the queue; "
                        "probing from %.0fs, at most every %.0fs", vendor, int(n), self.first_probe, self.max_probe)
        return False

    def record_auth_failure(self, vendor: str) -> AuthRefusal:
        """One answer 401/403 (call only with :attr:`auth_enabled`): counted; the ``auth_threshold``-th in a row
        pauses the vendor. While it is paused, the delivery that drew the answer goes back to its queue."""
        state, n, paused_now = self._auth_failure(keys=self._keys(vendor)[:1],
                                                  args=[self.auth_threshold, self.auth_interval])
        self._set(vendor, _text(state) in HELD_STATES, 0, int(n))  # the answer ended any run of failures
        return AuthRefusal(_text(state) == AUTH_FAILED, bool(int(paused_now)), int(n))

    # -- the ticker and the probe ---------------------------------------------

    def poll(self, vendor: str) -> BreakerState:
        """Read the shared state (and refresh this process's view of it)."""
        state, failures, since, probe_in, now, auth = self._poll(keys=self._keys(vendor))
        state, probe_in = _text(state), _text(probe_in)
        self._set(vendor, state in HELD_STATES, int(failures), int(auth))
        return BreakerState(state, int(failures), float(since) if since else None,
                            probe_in not in ("", "busy") and float(probe_in) <= 0, float(now), int(auth))

    def claim_probe(self, vendor: str, lease: float, holder: str) -> bool:
        """Take the one probe lease if a probe is due; it expires after ``lease`` seconds if never returned."""
        return bool(int(self._claim(keys=self._keys(vendor), args=[int(lease * 1000), holder])))

    def probe_done(self, vendor: str, failed: bool) -> None:
        """Give the lease back; a failed probe puts off the next one: doubling the spacing (up to ``max_probe``)
        while open, by the same ``auth_interval`` while paused for the credentials."""
        self._done(keys=self._keys(vendor), args=[self.max_probe, "1" if failed else "0"])

    def _set(self, vendor: str, is_open: bool, failures: int, auth_failures: int) -> None:
        with self._lock:
            self._view[vendor] = (is_open, failures, auth_failures)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
