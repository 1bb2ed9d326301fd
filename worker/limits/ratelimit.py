"""Global rate limits per vendor in Redis, shared by every worker, that hold at the vendor.

:class:`WindowLimiter` (what :func:`limiter_for` gives) keeps a vendor that counts
its limit N over ANY 1-second window of arrivals happy although a request reaches
the vendor a little later than its reserved moment (thread wake-up, GIL, a new
connection). Each reservation is logged in Redis with its *latest possible
arrival* (reserved time + ``margin``; + ``cold_margin`` for a thread's first
request, which opens a connection), and a new reservation at ``t`` needs
fewer than N logged requests that could arrive after ``t - 1 s``: then no
1-second window can hold N + 1 arrivals, whatever each one's lateness up to its
margin. Reservations are also spaced ``1/rate`` apart, so a backlog (or the
end of a ``Retry-After`` pause) leaves evenly, never in a burst. The result at
full load: N requests per ``1 + margin`` seconds. The rate used is the
*effective* rate, which follows the vendor's 429s and announced limits
(:mod:`worker.limits.adaptive`). One Lua script per operation, on Redis' clock.

:class:`TokenBucket` is the plain GCRA below, kept for callers that want it.

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
    >>> limiter = limiter_for(redis.Redis(), "vdw:ratelimit:loops", rate=10)  # doctest: +SKIP
    >>> limiter.acquire(max_wait=2.0)                                     # doctest: +SKIP
    Reservation(granted=True, wait=0.095)
    >>> limiter.observe(429, {"x-ratelimit-limit": "10"})                  # doctest: +SKIP
    >>> limiter.effective_rate()                                           # doctest: +SKIP
    7.0
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis

from . import adaptive

log = logging.getLogger(__name__)

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
    #: The limiter's epoch when reserved (limiters that revoke slots: a pause or a lower rate bumps it).
    epoch: int | None = None
    #: The slot's entry in the limiter's log and its time on Redis' clock (limiters that admit at send time).
    seq: int | None = None
    at: float | None = None
    #: Seconds from asking to reading the answer, on this host: a reply read late (a thread or greenlet not
    #: scheduled at once) makes the slot that much later than Redis said.
    rtt: float = 0.0


@dataclass(frozen=True)
class Admission:
    """The last look at a reserved slot, just before sending. ``admitted``: send now (``wait`` is how
    late, in seconds). Otherwise ``wait`` > 0 means the slot is still ahead (sleep, look again), and
    ``why`` = ``"revoked"`` (a pause or a lower rate came) or ``"late"`` (past the lateness the slot
    allows): take another slot; this one was given up."""

    admitted: bool
    wait: float = 0.0
    why: str = ""
    #: Admitted: the latest moment (this host's ``time.monotonic()``) the request may still leave, or None
    #: (any time). A thread that got no CPU between the last look and the send is as late as one that woke late.
    send_by: float | None = None


class RateLimiter:
    """Base class of the strategies below."""

    #: Seconds a holder may send later than its reservation (None: any lateness is fine).
    tolerance: float | None = None

    def acquire(self, max_wait: float = 0.0) -> Reservation:
        raise NotImplementedError

    def penalize(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (the vendor said Retry-After)."""

    def observe(self, status: int, headers: Mapping[str, str]) -> None:
        """Learn from a vendor's answer (429s, rate-limit headers)."""

    def still_valid(self, reservation: Reservation) -> bool:
        """After waiting for a reserved slot: False if a pause or a lower rate since revoked it."""
        return True

    def admit(self, reservation: Reservation, strict: bool = True) -> Admission:
        """Just before sending on a slot that was waited for: may it go now? ``strict=False`` lets a
        late holder go anyway (it has taken new slots often enough)."""
        return Admission(self.still_valid(reservation))

    def hold(self, reservation: Reservation, sleep: Callable[[float], None], strict: bool = True) -> Admission:
        """Sleep until ``reservation``'s slot and take the last look (:meth:`admit`): admitted = send
        now; otherwise the slot was given up (``why``: revoked, or this thread woke too late for it):
        reserve another."""
        if reservation.wait <= 0:
            if self.tolerance is None or reservation.rtt <= self.tolerance:
                return Admission(True, reservation.rtt, send_by=self._send_by(reservation.rtt))
        else:
            sleep(reservation.wait)
        for _ in range(3):
            a = self.admit(reservation, strict)
            if a.admitted or a.wait <= 0:
                return a
            sleep(a.wait)  # early (another host's clock, a short sleep): the slot is still ahead
        a = self.admit(reservation, strict)
        return a if a.admitted or a.why else Admission(False, 0.0, "late")

    def effective_rate(self) -> float | None:
        """Requests per second in use now (None: unlimited)."""
        return None

    def _send_by(self, late: float) -> float | None:
        """The latest moment (``time.monotonic()``) a request admitted just now, ``late`` seconds after its slot,
        may leave (None: any time)."""
        return None


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

    def effective_rate(self) -> float | None:
        return self.rate


#: Seconds by which a request may reach the vendor later than reserved (wake-up, GIL, sending).
DEFAULT_MARGIN = 0.03
#: The same for a thread's first request to a vendor (or after ``COLD_AFTER`` idle): it opens a connection.
DEFAULT_COLD_MARGIN = 0.3
#: Seconds a request may take from the last check of its deadline (:attr:`Admission.send_by`) to its arrival
#: at the vendor, warm: the rest of the margin is for reaching that check.
SEND_ALLOWANCE = 0.005
#: A thread that has not sent to a vendor for this long (seconds) counts as cold again.
COLD_AFTER = 60.0
#: Seconds the adaptive state outlives its last use.
STATE_TTL = 600.0

_WINDOW_LUA = adaptive.ADAPT_LUA + """
local function window_of(rate)
  local n = math.max(1, math.floor(rate + 1e-9))
  return n, n / rate
end
"""

# KEYS: state hash, log zset. ARGV: now ('' = Redis TIME), ceiling, lateness, max_wait,
# responses, 429s, full windows, announced limit (0 = none).
# Returns: granted, wait, effective rate, old rate, reason of a change ('' = none), epoch.
_WINDOW_ACQUIRE = _WINDOW_LUA + """
local now = clock(ARGV[1])
local ceiling = tonumber(ARGV[2])
local late = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local st = load(KEYS[1], now, ceiling)
local old, reason = adapt(st, now, ceiling, tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]))
local n, window = window_of(st.rate)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local t = math.max(now, st.tat)
local nth = redis.call('ZREVRANGE', KEYS[2], n - 1, n - 1, 'WITHSCORES')
if nth[2] then t = math.max(t, tonumber(nth[2]) + window) end
local wait = t - now
local granted = 0
if wait <= max_wait then
  granted = 1
  st.tat = t + 1 / st.rate
  st.seq = st.seq + 1
  redis.call('ZADD', KEYS[2], t + late, st.seq)
  redis.call('PEXPIRE', KEYS[2], math.ceil((t + late + window - now) * 1000) + 1000)
end
save(KEYS[1], st, """ + str(int(STATE_TTL * 1000)) + """)
return {granted, tostring(wait), tostring(st.rate), tostring(old), reason, st.epoch, st.seq, string.format('%.6f', t)}
"""

# KEYS: state hash, log zset. ARGV: now ('' = Redis TIME), the slot's log member, its epoch, its time,
# the latest admission time ('' = any). Returns: admitted, seconds (early: until the slot; admitted: how
# late), why not ('' | 'revoked' | 'late').
_WINDOW_ADMIT = _WINDOW_LUA + """
local now = clock(ARGV[1])
local at = tonumber(ARGV[4])
local why = ''
if tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0') ~= tonumber(ARGV[3]) then
  why = 'revoked'
elseif now < at then
  return {0, tostring(at - now), ''}
elseif ARGV[5] ~= '' and now > tonumber(ARGV[5]) then
  why = 'late'
end
if why ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[2])
  return {0, '0', why}
end
return {1, tostring(now - at), ''}
"""

# KEYS: state hash, log zset. ARGV: now, ceiling, responses, 429s, full windows, announced, pause seconds, margin.
# Returns: effective rate, old rate, reason.
_WINDOW_OBSERVE = _WINDOW_LUA + """
local now = clock(ARGV[1])
local ceiling = tonumber(ARGV[2])
local st = load(KEYS[1], now, ceiling)
local old, reason = adapt(st, now, ceiling, tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]))
if tonumber(ARGV[4]) > 0 then
  -- A 429 while our own log holds k slots in the last second: the vendor lets fewer than k through.
  local sent = redis.call('ZCOUNT', KEYS[2], now - 1, now + tonumber(ARGV[8]))
  local before = st.rate
  local why = count_cut(st, now, ceiling, sent)
  if why ~= '' then
    if reason == '' then old = before end
    reason = why
  end
end
local pause = tonumber(ARGV[7])
if pause > 0 then
  if now + pause > st.tat then st.tat = now + pause end
  st.epoch = st.epoch + 1
end
save(KEYS[1], st, """ + str(int(STATE_TTL * 1000)) + """)
return {tostring(st.rate), tostring(old), reason}
"""


class WindowLimiter(RateLimiter):
    """At most ``rate`` requests in any second *at the vendor*, across every process using ``key``.

    ``margin``: seconds a request may arrive later than reserved; ``cold_margin`` the same for
    a request that opens a connection first: one for which ``warm()`` is False (no idle connection to
    the vendor at hand), or without ``warm``, a thread's first request. ``clock``: seconds for the
    scripts instead of Redis' clock (tests).
    """

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        rate: float,
        *,
        margin: float = DEFAULT_MARGIN,
        cold_margin: float = DEFAULT_COLD_MARGIN,
        name: str | None = None,
        clock: Callable[[], float] | None = None,
        warm: Callable[[], bool] | None = None,
    ) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number, got {rate!r}; use Unlimited for no limit")
        if not 0 <= margin < 1 or not margin <= cold_margin < 5:
            raise ValueError(f"need 0 <= margin ({margin}) < 1 and margin <= cold_margin ({cold_margin}) < 5 seconds")
        self.key = key
        self.rate = float(rate)
        self.margin = margin
        self.cold_margin = cold_margin
        self.tolerance: float = margin / 2
        self.name = name or key.rsplit(":", 1)[-1]
        self.clock = clock
        self.warm = warm
        # Times this host's wait for Redis' answers (not with a test clock: its scripts' time is made up).
        self._stopwatch: Callable[[], float] = time.monotonic if clock is None else (lambda: 0.0)
        self._last_send = -math.inf
        self._keys = [f"{key}:state", f"{key}:log"]
        self._acquire = client.register_script(_WINDOW_ACQUIRE)
        self._observe = client.register_script(_WINDOW_OBSERVE)
        self._admit = client.register_script(_WINDOW_ADMIT)
        self._client = client
        self._pending = adaptive.Pending()
        self._local = threading.local()
        self._announced: float | None = None
        self._announced_sent = -math.inf
        self._rate: float | None = None

    def _now(self) -> str:
        return "" if self.clock is None else repr(self.clock())

    def acquire(self, max_wait: float = 0.0) -> Reservation:
        here = time.monotonic()
        if self.warm is not None:  # the HTTP transport says whether a connection to the vendor is at hand
            cold = not self.warm() or here - self._last_send > COLD_AFTER
        else:  # a connection per thread
            last = getattr(self._local, "last_send", None)
            cold = last is None or here - last > COLD_AFTER
        responses, too_many, full = self._pending.take()
        asked = self._stopwatch()
        granted, wait, rate, old, reason, epoch, seq, at = self._acquire(
            keys=self._keys,
            args=[self._now(), self.rate, self.cold_margin if cold else self.margin, max_wait,
                  responses, too_many, full, 0])
        self._changed(float(rate), float(old), reason)
        if int(granted):
            self._local.last_send = self._last_send = here + float(wait)
        return Reservation(bool(int(granted)), float(wait), int(epoch), int(seq), float(at),
                           self._stopwatch() - asked)

    def penalize(self, seconds: float) -> None:
        if seconds > 0:
            self._flush(pause=seconds)

    def still_valid(self, reservation: Reservation) -> bool:
        """One HGET, only for a thread that waited: has a Retry-After pause or a cut come since?"""
        if reservation.epoch is None:
            return True
        try:
            return int(self._client.hget(self._keys[0], "epoch") or 0) == reservation.epoch
        except redis.RedisError:  # Redis away (a restart): the slot was granted; keep it
            return True

    def admit(self, reservation: Reservation, strict: bool = True) -> Admission:
        """One script on Redis' clock: the slot's epoch still current, and (``strict``) now no later
        than the slot plus ``tolerance``. A slot refused is taken out of the log in the same script,
        so nothing can send on it; the request that does go arrives within ``margin`` of its slot."""
        if reservation.epoch is None or reservation.seq is None or reservation.at is None:
            return Admission(True)
        latest = repr(reservation.at + self.tolerance) if strict else ""
        asked = self._stopwatch()
        try:
            ok, seconds, why = self._admit(keys=self._keys, args=[
                self._now(), reservation.seq, reservation.epoch, repr(reservation.at), latest])
        except redis.RedisError:  # Redis away (a restart): the slot was granted; keep it
            return Admission(True)
        read = self._stopwatch()
        late = float(seconds)
        if int(ok) and strict and late + (read - asked) > self.tolerance:
            # Redis admitted it in time, but this thread read the answer too late (not scheduled at once: a
            # busy GIL, or other greenlets ran first): do not send. The slot stays logged, unused: safe.
            return Admission(False, 0.0, "late")
        reason = why.decode() if isinstance(why, bytes) else why
        if int(ok):
            late += read - asked
            return Admission(True, late, reason, self._send_by(late) if strict else None)
        return Admission(False, late, reason)

    def observe(self, status: int, headers: Mapping[str, str]) -> None:
        s = adaptive.signals(status, headers)
        self._pending.add(s)
        announce = 0.0
        if s.announced is not None and (s.announced != self._announced or
                                        time.monotonic() - self._announced_sent > adaptive.ANNOUNCE_REFRESH):
            announce = s.announced
        if s.too_many or announce:
            try:
                self._flush(announced=announce)
            except redis.RedisError as exc:  # the answer is in; the delivery must not fail over bookkeeping
                log.warning("%s: could not record the vendor's rate-limit answer: %s", self.name, exc)

    def _send_by(self, late: float) -> float | None:
        """From now, what is left of the margin after ``late``, less :data:`SEND_ALLOWANCE` for the way to the
        vendor (a cold request's extra margin is for the connection it opens after that check). None with a margin
        too small to split, or with a test clock."""
        if self.clock is not None or self.margin <= 2 * SEND_ALLOWANCE:
            return None
        return time.monotonic() + self.margin - late - SEND_ALLOWANCE

    def effective_rate(self) -> float | None:
        """The rate every worker uses now (read from Redis)."""
        got = self._client.hget(self._keys[0], "rate")
        return float(got) if got is not None else self.rate

    def _flush(self, announced: float = 0.0, pause: float = 0.0) -> None:
        responses, too_many, full = self._pending.take()
        rate, old, reason = self._observe(
            keys=self._keys, args=[self._now(), self.rate, responses, too_many, full, announced, pause, self.margin])
        if announced:
            self._announced, self._announced_sent = announced, time.monotonic()
        self._changed(float(rate), float(old), reason)

    def _changed(self, rate: float, old: float, reason: bytes | str) -> None:
        self._rate = rate
        if reason:
            why = reason.decode() if isinstance(reason, bytes) else reason
            log.info("%s: effective rate %.1f -> %.1f/s after %s", self.name, old, rate, why)


def limiter_for(client: redis.Redis, key: str, rate: float, *, margin: float | None = None,
                cold_margin: float | None = None, warm: Callable[[], bool] | None = None) -> RateLimiter:
    """The right strategy for ``rate`` (requests per second; 0 = unlimited).

    ``margin`` and ``cold_margin`` default to the settings ``RATE_LIMIT_MARGIN`` and
    ``RATE_LIMIT_COLD_MARGIN``.
    """
    if rate <= 0:
        return Unlimited()
    if margin is None or cold_margin is None:
        from ..settings import get_settings

        s = get_settings()
        margin = s.rate_limit_margin if margin is None else margin
        cold_margin = s.rate_limit_cold_margin if cold_margin is None else cold_margin
    return WindowLimiter(client, key, rate, margin=margin, cold_margin=max(margin, cold_margin), warm=warm)
