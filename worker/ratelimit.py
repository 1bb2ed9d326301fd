"""Global rate limits: one token bucket per vendor in Redis, shared by every worker.

The bucket is a GCRA (generic cell rate algorithm) kept in one Redis key: the
*theoretical arrival time* of the next request. An atomic Lua script reads
Redis' clock, so worker hosts need not agree on the time. A caller may
*reserve* a token up to ``max_wait`` seconds ahead and sleep until then; a
vendor's ``Retry-After`` pushes the whole bucket back (:meth:`penalize`).

Example::

    >>> bucket = TokenBucket(redis.Redis(), "vdw:ratelimit:loops", rate=10)  # doctest: +SKIP
    >>> r = bucket.acquire(max_wait=1.0)                                   # doctest: +SKIP
    >>> r.granted, r.wait                                                  # doctest: +SKIP
    (True, 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

#: Requests a bucket lets through back to back after being idle: 1 keeps
#: strict spacing, which never trips a vendor counting per second.
DEFAULT_BURST = 1

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
if wait > max_wait then
  return {0, tostring(wait)}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return {1, tostring(wait)}
"""

_PENALIZE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tolerance = tonumber(ARGV[1]) * (tonumber(ARGV[2]) - 1)
local until_tat = now + tonumber(ARGV[3]) + tolerance
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_tat > tat then
  redis.call('SET', KEYS[1], tostring(until_tat), 'PX', math.ceil((until_tat - now) * 1000) + 1000)
end
return 1
"""


@dataclass(frozen=True)
class Reservation:
    """``granted``: a token is yours, send after ``wait`` seconds. Otherwise the
    next token is ``wait`` seconds away, beyond what you were willing to wait."""

    granted: bool
    wait: float


class RateLimiter:
    """Base class of the strategies below."""

    def acquire(self, max_wait: float = 0.0) -> Reservation:
        raise NotImplementedError

    def penalize(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (the vendor said Retry-After)."""


class Unlimited(RateLimiter):
    """For a rate of 0: every request goes at once."""

    def acquire(self, max_wait: float = 0.0) -> Reservation:
        return Reservation(True, 0.0)


class TokenBucket(RateLimiter):
    """``rate`` requests per second across every process that uses ``key``."""

    def __init__(self, client: redis.Redis, key: str, rate: float, burst: int = DEFAULT_BURST) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive; use Unlimited for no limit")
        self.key = key
        self.rate = rate
        self.burst = max(1, burst)
        self._acquire = client.register_script(_ACQUIRE)
        self._penalize = client.register_script(_PENALIZE)

    def acquire(self, max_wait: float = 0.0) -> Reservation:
        granted, wait = self._acquire(keys=[self.key], args=[1.0 / self.rate, self.burst, max_wait])
        return Reservation(bool(int(granted)), float(wait))

    def penalize(self, seconds: float) -> None:
        if seconds > 0:
            self._penalize(keys=[self.key], args=[1.0 / self.rate, self.burst, seconds])


def limiter_for(client: redis.Redis, key: str, rate: float) -> RateLimiter:
    """The right strategy for ``rate`` (requests per second; 0 = unlimited)."""
    return TokenBucket(client, key, rate) if rate > 0 else Unlimited()
