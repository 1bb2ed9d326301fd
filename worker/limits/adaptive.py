"""Adaptive limits: the effective rate every worker shares follows what the vendor says.

The configured rate is the ceiling. The effective rate (kept in Redis next to the
limiter's state, so every process on every host uses the same one) changes when:

- a vendor answers **429** anyway to more than ``CUT_SHARE`` of the responses of the
  current window, and at least ``MIN_429`` (so a stray 429 does not cost a tenth of the limit): it drops by
  that share (the vendor took about the rest), at least ×``MIN_DECREASE``, at most
  ×``DECREASE``, and at most once per ``CUT_GAP`` seconds (one burst, one cut);
- a vendor answers **429** while the limiter's own log holds ``k`` requests in the last
  second (every worker's): the vendor lets fewer than ``k`` through, so the rate drops to
  ``k - 1`` at once (at most halved by one cut). A vendor that counts strictly and lower
  than configured is found in one 429, not a staircase of them; a stray 429 at the right
  rate changes next to nothing (``k - 1`` is the rate already);
- a vendor **announces a lower limit** (Loops' ``x-ratelimit-limit``): it drops to
  that at once; the announcement caps the rate for ``ANNOUNCED_TTL`` seconds after
  it was last seen;
- a **quiet window** (``QUIET`` seconds with no 429 and no response saying nothing
  was left in the window, ``x-ratelimit-remaining: 0``) passes: it climbs by
  ``INCREASE`` × itself, up to the ceiling; but for ``BAD_TTL`` seconds after a 429
  it climbs no higher than ``BAD_SHARE`` × the rate that drew it, and by at most half the
  way there per window, so it settles just under the vendor's real limit instead of
  hitting it again and again (a cut lands near the real limit; a probe above it costs
  a few 429s, not a burst).

The arithmetic runs inside the limiter's Lua scripts (:data:`ADAPT_LUA`, one atomic
operation with the reservation). This module holds it, its parameters and the
pure, local half: reading a response (:func:`signals`) and counting it (:class:`Pending`).

Example::

    >>> signals(429, {"x-ratelimit-limit": "4", "x-ratelimit-remaining": "0"})
    Signals(too_many=True, announced=4.0, window_full=True)
    >>> signals(200, {})
    Signals(too_many=False, announced=None, window_full=False)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

#: A cut multiplies the effective rate by (1 - share of 429), within [MIN_DECREASE, DECREASE].
DECREASE = 0.9
MIN_DECREASE = 0.5
#: Cut only when more than this share of the window's responses, and at least MIN_429 of them, were 429.
CUT_SHARE = 0.1
MIN_429 = 2
#: Seconds after a cut in which further 429s (the same burst) do not cut again.
CUT_GAP = 1.0
#: A quiet window multiplies the effective rate by this (up to the ceiling).
INCREASE = 1.05
#: Seconds of a quiet window.
QUIET = 2.0
#: Seconds a 429 is remembered: meanwhile the rate climbs only towards BAD_SHARE x the rate that drew it.
BAD_TTL = 60.0
BAD_SHARE = 0.97
#: The effective rate never goes below this share of the ceiling.
FLOOR_SHARE = 0.05
#: Seconds an announced limit caps the rate after it was last seen.
ANNOUNCED_TTL = 30.0
#: A process re-sends an unchanged announced limit at most this often (seconds).
ANNOUNCE_REFRESH = 10.0

LIMIT_HEADER = "x-ratelimit-limit"
REMAINING_HEADER = "x-ratelimit-remaining"


@dataclass(frozen=True)
class Signals:
    """What one response says about the vendor's limit."""

    too_many: bool
    announced: float | None
    window_full: bool


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def signals(status: int, headers: Mapping[str, str]) -> Signals:
    """Read a response: a 429, an announced per-second limit (> 0), nothing left in the window."""
    announced = _number(headers.get(LIMIT_HEADER))
    remaining = _number(headers.get(REMAINING_HEADER))
    return Signals(status == 429, announced if announced else None, remaining is not None and remaining < 1)


class Pending:
    """Responses a process saw since it last told Redis; sent with its next acquire (no extra round trip)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.responses = 0
        self.too_many = 0
        self.full = 0

    def add(self, s: Signals) -> None:
        with self._lock:
            self.responses += 1
            self.too_many += s.too_many
            self.full += s.window_full

    def take(self) -> tuple[int, int, int]:
        """The counts so far, reset to zero."""
        with self._lock:
            out = (self.responses, self.too_many, self.full)
            self.responses = self.too_many = self.full = 0
        return out


#: Lua: ``adapt(st, now, ceiling, responses, too_many, full, announced)`` updates the state
#: table ``st`` (fields of the limiter's hash) and returns ``old_rate, reason`` ('' = no change);
#: ``count_cut(st, now, ceiling, sent)`` cuts to ``sent - 1`` after a 429 and returns its reason or ''.
#: A lower rate bumps ``st.epoch``: slots reserved before it are to be taken again.
ADAPT_LUA = f"""
local function adapt(st, now, ceiling, responses, too_many, full, announced)
  local old = st.rate
  if st.ceiling ~= ceiling then
    st.ceiling = ceiling
    st.rate = ceiling
  end
  if announced > 0 then
    st.announced = announced
    st.announced_until = now + {ANNOUNCED_TTL}
  end
  local cap = ceiling
  local capped = false
  if st.announced > 0 and now < st.announced_until and st.announced < cap then
    cap = st.announced
    capped = true
  end
  local floor = math.min(cap, math.max(0.1, ceiling * {FLOOR_SHARE}))
  local reason = ''
  st.n = st.n + responses
  st.n429 = st.n429 + too_many
  st.full = st.full + full
  local share = st.n429 / math.max(st.n, 1)
  if too_many > 0 and share > {CUT_SHARE} and st.n429 >= {MIN_429} and now - st.cut_at >= {CUT_GAP} then
    st.bad = st.rate
    st.bad_until = now + {BAD_TTL}
    st.rate = math.max(floor, st.rate * math.min({DECREASE}, math.max({MIN_DECREASE}, 1 - share)))
    st.cut_at = now
    st.win_start = now
    st.n, st.n429, st.full = 0, 0, 0
    reason = '429'
  elseif now - st.win_start >= {QUIET} then
    if st.n429 == 0 and st.full == 0 and st.rate < cap then
      if now < st.bad_until then
        local target = math.min(cap, st.bad * {BAD_SHARE})
        if st.rate < target - 0.01 * ceiling then
          st.rate = math.min(st.rate + (target - st.rate) / 2, st.rate * {INCREASE})
        end
      else
        st.rate = math.min(cap, st.rate * {INCREASE})
      end
      reason = 'a quiet window'
    end
    st.win_start = now
    st.n, st.n429, st.full = 0, 0, 0
  end
  if st.rate > cap then
    st.rate = cap
    reason = capped and 'the vendor announced its limit' or 'the configured limit'
  end
  if st.rate == old then reason = '' end
  if st.rate < old then st.epoch = st.epoch + 1 end
  return old, reason
end

local function count_cut(st, now, ceiling, sent)
  local est = sent - 1
  local cap = math.max(st.rate * {MIN_DECREASE}, math.max(0.1, ceiling * {FLOOR_SHARE}), est)
  if est < 1 or cap >= st.rate then return '' end
  st.bad = st.rate
  st.bad_until = now + {BAD_TTL}
  st.rate = cap
  st.cut_at = now
  st.win_start = now
  st.n, st.n429, st.full = 0, 0, 0
  st.epoch = st.epoch + 1
  return '429 with ' .. sent .. ' requests in the last second'
end

local FIELDS = {{'tat', 'rate', 'ceiling', 'announced', 'announced_until', 'win_start', 'n', 'n429', 'full',
                'cut_at', 'seq', 'bad', 'bad_until', 'epoch'}}

local function load(key, now, ceiling)
  local v = redis.call('HMGET', key, unpack(FIELDS))
  local st = {{}}
  for i, f in ipairs(FIELDS) do st[f] = tonumber(v[i]) end
  if st.rate == nil then st.rate = ceiling end
  if st.ceiling == nil then st.ceiling = ceiling end
  st.tat = st.tat or 0
  st.announced = st.announced or 0
  st.announced_until = st.announced_until or 0
  st.win_start = st.win_start or now
  st.n, st.n429, st.full = st.n or 0, st.n429 or 0, st.full or 0
  st.cut_at = st.cut_at or -1e18
  st.seq = st.seq or 0
  st.bad = st.bad or ceiling
  st.bad_until = st.bad_until or 0
  st.epoch = st.epoch or 0
  return st
end

local function save(key, st, ttl_ms)
  local flat = {{}}
  for _, f in ipairs(FIELDS) do
    flat[#flat + 1] = f
    flat[#flat + 1] = string.format('%.17g', st[f])
  end
  redis.call('HSET', key, unpack(flat))
  redis.call('PEXPIRE', key, ttl_ms)
end

local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""
