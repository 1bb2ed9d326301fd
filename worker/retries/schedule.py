"""Retries wait in Redis: one sorted set per vendor of Celery messages, scored by when they are due.

A delivery that must retry is written here *and* its current message is
acknowledged in one Lua script, so there is no moment when it exists in
neither place (nor, short of a Redis failover, in both). Each entry is a whole
kombu message with its own delivery tag, so two retries of equal content stay
two members. Every worker process moves due entries back onto the vendor's
queue (:meth:`RetrySchedule.promote`) with one atomic script, a bounded chunk
at a time: any number of processes on any number of hosts can do it at once,
and each entry is moved exactly once. Scores use Redis' clock, so hosts need
not agree on the time. Nothing waits in a worker's memory.

Example::

    >>> schedule = RetrySchedule(redis.Redis(), "vdw")                        # doctest: +SKIP
    >>> schedule.add("loops", message, delay=4.2, ack_tag="6f1c...")          # doctest: +SKIP
    >>> schedule.promote("loops")  # later, from any worker: (moved, seconds until the next is due)  # doctest: +SKIP
    (1, None)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import redis

from ..keys import UNACKED, UNACKED_INDEX

#: Entries one script call moves; a larger backlog takes several calls, so Redis never blocks long.
CHUNK = 500

#: Set when this process puts a retry on the schedule: its ticker looks again at once (see :func:`poke`).
WAKE = threading.Event()


def poke() -> None:
    """A retry was just scheduled here: let this process's ticker recompute when the next one is due."""
    WAKE.set()

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: schedule, unacked, unacked_index. ARGV: delay, message, tag of the message being acknowledged ('' = none).
_ADD = _NOW + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HDEL', KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[3])
end
return 1
"""

# KEYS: schedule, queue. ARGV: most to move, 1 = everything (due or not).
# Returns {moved, seconds until the next entry is due or -1 when none waits}.
_PROMOTE = _NOW + """
local upto = now
if ARGV[2] == '1' then upto = '+inf' end
local due = redis.call('ZRANGE', KEYS[1], '-inf', upto, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('LPUSH', KEYS[2], m)
end
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return {#due, '-1'} end
local wait = tonumber(nxt[2]) - now
if wait < 0 then wait = 0 end
return {#due, tostring(wait)}
"""

# KEYS: schedule, queue, unacked, unacked_index. Takes ONE message for a probe: the earliest waiting retry,
# else the next message on the queue, and records it as held (as kombu does for a consumed message), so a
# probe whose process dies is redelivered like any other. Returns the message, or false.
# As the consumer's take (worker/broker/transport.py, _TAKE): read, record (HSET, the first write: a full Redis
# refuses the script whole, nothing taken), then remove. Redis checks maxmemory at a script's first write only.
_CLAIM_ONE = _NOW + """
local m = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
local scheduled = m ~= nil
if not scheduled then m = redis.call('LINDEX', KEYS[2], -1) end
if not m then return false end
local ok, decoded = pcall(cjson.decode, m)
local tag = ok and type(decoded) == 'table' and type(decoded['properties']) == 'table'
            and decoded['properties']['delivery_tag']
if type(tag) ~= 'string' then
  if scheduled then                 -- not ours to judge: onto the queue, where a worker takes it next
    redis.call('ZREM', KEYS[1], m)
    redis.call('RPUSH', KEYS[2], m)
  end                               -- (already there: left where it is)
  return false
end
-- kombu's record is [message, exchange, routing key]: the message's own JSON text, spliced in unchanged
redis.call('HSET', KEYS[3], tag, '[' .. m .. ', "", ' .. cjson.encode(ARGV[1]) .. ']')
redis.call('ZADD', KEYS[4], now, tag)
if scheduled then redis.call('ZREM', KEYS[1], m) else redis.call('RPOP', KEYS[2]) end
return m
"""

# KEYS: unacked_index, unacked. ARGV: a delivery tag. Forgets a held message (kombu's ack, as a script).
_ACK = """
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('HDEL', KEYS[2], ARGV[1])
"""

# KEYS: schedule. Returns {count, seconds until the first is due or -1}.
_STATS = _NOW + """
local n = redis.call('ZCARD', KEYS[1])
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return {n, '-1'} end
return {n, tostring(tonumber(nxt[2]) - now)}
"""


@dataclass(frozen=True)
class Waiting:
    """Retries waiting for one vendor: how many, and in how many seconds the first is due (None: none)."""

    count: int
    next_due_in: float | None


class RetrySchedule:
    """The per-vendor retry schedules under ``<prefix>:retries:<vendor>``."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._add = client.register_script(_ADD)
        self._promote = client.register_script(_PROMOTE)
        self._claim = client.register_script(_CLAIM_ONE)
        self._stats = client.register_script(_STATS)
        self._ack = client.register_script(_ACK)

    @classmethod
    def default(cls) -> RetrySchedule:
        """The schedule the settings name: the process's Redis client and KEY_PREFIX."""
        from .. import clients
        from ..settings import get_settings

        return cls(clients.redis_client(), get_settings().key_prefix)

    def key(self, vendor: str) -> str:
        return f"{self.prefix}:retries:{vendor}"

    def add(self, vendor: str, message: str, delay: float, ack_tag: str | None = None) -> None:
        """Schedule ``message`` (a whole kombu message) ``delay`` seconds from now; acknowledge ``ack_tag``."""
        self._add(keys=[self.key(vendor), UNACKED, UNACKED_INDEX], args=[max(0.0, delay), message, ack_tag or ""])

    def promote(self, vendor: str, queue: str | None = None, everything: bool = False) -> tuple[int, float | None]:
        """Move due entries (all of them with ``everything``) onto the vendor's queue, a chunk at a time.

        Returns how many moved and the seconds until the next remaining entry is due (None: none waits).
        """
        moved, wait = 0, None
        while True:
            n, w = self._promote(keys=[self.key(vendor), queue or vendor], args=[CHUNK, "1" if everything else "0"])
            moved += int(n)
            wait = None if float(w) < 0 else float(w)
            if int(n) < CHUNK:
                return moved, wait

    def release(self, vendor: str, queue: str | None = None) -> int:
        """Every waiting retry of ``vendor`` is due now: onto its queue, in chunks."""
        return self.promote(vendor, queue, everything=True)[0]

    def claim_one(self, vendor: str, queue: str | None = None) -> str | None:
        """Take one message to probe with (earliest retry, else the queue's next), held as unacknowledged."""
        queue = queue or vendor
        m = self._claim(keys=[self.key(vendor), queue, UNACKED, UNACKED_INDEX], args=[queue])
        return m.decode() if isinstance(m, bytes) else m

    def ack(self, tag: str) -> None:
        """Forget a message claimed by :meth:`claim_one` (its delivery ended). Two deletes in one script, which
        Redis runs at maxmemory too (a MULTI it refuses whole there, deletes included)."""
        self._ack(keys=[UNACKED_INDEX, UNACKED], args=[tag])

    def give_back(self, queue: str, message: str, tag: str) -> None:
        """Put a claimed message back where a worker takes it next, untouched."""
        pipe = self.client.pipeline()
        pipe.rpush(queue, message)
        pipe.hdel(UNACKED, tag)
        pipe.zrem(UNACKED_INDEX, tag)
        pipe.execute()

    def waiting(self, vendor: str) -> Waiting:
        n, w = self._stats(keys=[self.key(vendor)])
        return Waiting(int(n), None if float(w) < 0 else max(0.0, float(w)))
