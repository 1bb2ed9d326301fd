"""Per-person order at each vendor: a person's calls reach a vendor in the order Redis received them.

Each delivery message of a call stays a Celery task of its own, but what it
*does* is kept per (vendor, person) in Redis, in the order producers' writes
arrived:

- ``<prefix>:order:<vendor>:<person>``: a list of the person's pending task
  ids, oldest first (the producer appends in the same MULTI as it queues the
  message: :func:`worker.keys.order_commands`);
- ``<prefix>:order:<vendor>:events``: task id -> the call's event JSON.

A worker that takes any of a person's messages asks for the person's *turn*
(:meth:`PersonLog.claim`, one Lua script: the decision is Redis', never a
check-then-act in Python). With the turn it delivers the person's pending calls
from the oldest, merging a run of identify/segment calls into one request, and
removes each from the list once delivered or dead-lettered
(:meth:`PersonLog.finish`). Whoever takes a message whose call is no longer
pending (delivered with another's request) acknowledges it. A message taken
while another task holds the turn is *parked* under the person
(:meth:`PersonLog.park`: moved from kombu's unacknowledged hash in the same
step) and goes back to the front of the queue when the turn is given up.

The turn is a lease in Redis (the holder's task id, expiring after the
visibility timeout), so a worker that dies holding it delays the person at most
that long: its own message comes back and takes the turn again. A delivery
waiting on the retry schedule keeps the turn until it is due (plus the
visibility timeout): the person's later calls wait for it, other people and
other vendors do not.

Example::

    >>> log = PersonLog(redis.Redis(), "vdw", "loops")                     # doctest: +SKIP
    >>> turn = log.claim("a1b2...", "e1.loops", lease=35.0)                 # doctest: +SKIP
    >>> turn.state, [e.task_id for e in turn.entries]                       # doctest: +SKIP
    ('turn', ['e1.loops', 'e2.loops'])
    >>> log.finish("a1b2...", "e1.loops", done=["e1.loops", "e2.loops"])    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from ..keys import UNACKED, UNACKED_INDEX, order_keys
from ..scripts import ScriptCall

#: Pending calls one claim (or one round of a turn) reads: a merged request carries at most this many.
MAX_ENTRIES = 100

#: Parked messages one step puts back on the queue (a turn's end, a sweep): Redis never blocks long on a flood.
UNPARK_MAX = 500


CLAIMED, DONE, BUSY, PARKED = "turn", "done", "busy", "parked"


#: The claim, as a Lua function the scripts here and the transport's take share: ``vdw_claim(list, events, turn,
#: outcome, task id, lease ms, most entries)``. done: this call is no longer pending ({'done', outcome or ''});
#: busy: another task holds the turn ({'busy', holder}); turn: this task holds it now ({'turn', id1, json1, ...}).
CLAIM_FN = """
local function vdw_claim(list, events, turn, outcome, task, lease, most)
  if redis.call('HEXISTS', events, task) == 0 then
    local o = redis.call('HGET', outcome, task)
    if o then redis.call('HDEL', outcome, task) end
    return {'done', o or ''}
  end
  local holder = redis.call('GET', turn)
  if holder and holder ~= task then return {'busy', holder} end
  redis.call('SET', turn, task, 'PX', lease)
  local ids = redis.call('LRANGE', list, 0, tonumber(most) - 1)
  local out = {'turn'}
  if #ids > 0 then
    local evs = redis.call('HMGET', events, unpack(ids))
    for i = 1, #ids do
      out[#out + 1] = ids[i]
      out[#out + 1] = evs[i] or ''
    end
  end
  return out
end
"""

# KEYS: list, events, turn, outcome. ARGV: task id, lease ms, most entries.
_CLAIM = CLAIM_FN + """
return vdw_claim(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3])
"""

# KEYS: list, events, turn, outcome, parked, unacked, unacked_index, held. ARGV: task id, lease ms, most entries,
# message (to park), delivery tag (acknowledged when parked), person id.
# As _CLAIM, but when another task holds the turn the message is parked under the person and its kombu record
# removed, in one step: {'parked', holder}.
_PARK = CLAIM_FN + """
local r = vdw_claim(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3])
if r[1] ~= 'busy' then return r end
redis.call('RPUSH', KEYS[5], ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HDEL', KEYS[6], ARGV[5])
  redis.call('ZREM', KEYS[7], ARGV[5])
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[8], 'NX', tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[6])
return {'parked', r[2]}
"""

# KEYS: list, events, turn, outcome, parked, queue, held, unacked, unacked_index. ARGV: task id, lease ms, most
# entries, go on (1/0), person id, delivery tag to acknowledge ('' none), number of done ids n, the n done ids,
# then pairs (task id, outcome) of dead-lettered ones. With a tag, the message is acknowledged (kombu's record
# removed) in the same step: a delivery's end and its acknowledgement are one round trip.
# Removes the done calls from the person's order. Then, while this task still holds the turn: with go on and
# calls left, keeps the turn and returns them ({'turn', id1, json1, ...}); else gives the turn up and puts the
# person's parked messages (at most UNPARK; the rest at the next sweep) back at the front of the queue
# ({'released', n}).
_FINISH = "local UNPARK = %(unpark)d" + """
if ARGV[6] ~= '' then
  redis.call('HDEL', KEYS[8], ARGV[6])
  redis.call('ZREM', KEYS[9], ARGV[6])
end
local n = tonumber(ARGV[7])
for i = 1, n do
  local id = ARGV[7 + i]
  redis.call('LREM', KEYS[1], 1, id)
  redis.call('HDEL', KEYS[2], id)
end
local i = 8 + n
while ARGV[i] do
  if ARGV[i] ~= ARGV[1] then redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1]) end
  i = i + 2
end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then return {'lost', holder} end
if ARGV[4] == '1' and holder then
  local ids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)
  if #ids > 0 then
    redis.call('PEXPIRE', KEYS[3], ARGV[2])
    local evs = redis.call('HMGET', KEYS[2], unpack(ids))
    local out = {'turn'}
    for j = 1, #ids do
      out[#out + 1] = ids[j]
      out[#out + 1] = evs[j] or ''
    end
    return out
  end
end
if holder then redis.call('DEL', KEYS[3]) end
local parked = redis.call('LRANGE', KEYS[5], 0, UNPARK - 1)
for j = 1, #parked do
  redis.call('RPUSH', KEYS[6], parked[j])
end
redis.call('LTRIM', KEYS[5], #parked, -1)
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('ZADD', KEYS[7], 0, ARGV[5])   -- more parked than one step moves: the next sweep takes them
else
  redis.call('ZREM', KEYS[7], ARGV[5])
end
return {'released', #parked}
"""

# KEYS: turn. ARGV: task id, lease ms. The holder keeps its turn this much longer (a retry waiting its time).
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: held, queue. ARGV: order key base, older than (Redis time - seconds), most to look at.
# People with parked messages and no turn holder (the holder's lease ran out and its message is gone or far
# back in the queue): their parked messages go back to the front of the queue. Returns how many people.
_SWEEP = "local UNPARK = %(unpark)d" + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local people = redis.call('ZRANGE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'BYSCORE', 'LIMIT', 0, ARGV[3])
local swept = 0
for _, p in ipairs(people) do
  if redis.call('EXISTS', ARGV[1] .. ':turn:' .. p) == 0 then
    local pk = ARGV[1] .. ':parked:' .. p
    local parked = redis.call('LRANGE', pk, 0, UNPARK - 1)
    for j = 1, #parked do redis.call('RPUSH', KEYS[2], parked[j]) end
    redis.call('LTRIM', pk, #parked, -1)
    if redis.call('EXISTS', pk) == 0 then redis.call('ZREM', KEYS[1], p) end
    swept = swept + 1
  end
end
return swept
"""


@dataclass(frozen=True)
class Entry:
    """One pending call of a person: its task id and event JSON."""

    task_id: str
    event_json: str


@dataclass(frozen=True)
class Turn:
    """What a claim (or a finished round) answered."""

    #: CLAIMED (this task holds the turn: ``entries`` are the person's pending calls, oldest first), DONE (this
    #: call is no longer pending: ``outcome`` says how it ended if it was dead-lettered), BUSY or PARKED
    #: (``holder`` holds the turn), "released" or "lost" (the turn given up, or found in another's hands).
    state: str
    entries: tuple[Entry, ...] = ()
    holder: str = ""
    outcome: str = ""
    unparked: int = 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def turn_from_reply(reply: Sequence[bytes | str]) -> Turn:
    """A :class:`Turn` from what ``vdw_claim`` (or a script built on it) answered."""
    state = _text(reply[0])
    if state == CLAIMED:
        items = [_text(x) for x in reply[1:]]
        return Turn(state, tuple(Entry(items[i], items[i + 1]) for i in range(0, len(items), 2)))
    if state == DONE:
        return Turn(state, outcome=_text(reply[1]))
    if state == "released":
        return Turn(state, unparked=int(reply[1]))
    return Turn(state, holder=_text(reply[1]))


class PersonLog:
    """The per-person order of one vendor's calls under ``<prefix>:order:<vendor>``."""

    def __init__(self, client: redis.Redis, prefix: str, vendor: str, queue: str | None = None) -> None:
        self.client = client
        self.vendor = vendor
        self.queue = queue or vendor
        self.events, self.base = order_keys(prefix, vendor)
        self.outcome = f"{self.base}:outcome"
        self.held = f"{self.base}:held"
        self._claim = client.register_script(_CLAIM)
        self._park = client.register_script(_PARK)
        self._finish = client.register_script(_FINISH % {"unpark": UNPARK_MAX})
        self._extend = client.register_script(_EXTEND)
        self._sweep = client.register_script(_SWEEP % {"unpark": UNPARK_MAX})

    def _keys(self, person: str) -> list[str]:
        return [f"{self.base}:{person}", self.events, f"{self.base}:turn:{person}", self.outcome]

    def claim(self, person: str, task_id: str, lease: float, most: int = MAX_ENTRIES) -> Turn:
        """Take the person's turn for ``task_id`` (DONE if its call is no longer pending, BUSY if held)."""
        return turn_from_reply(self._claim(keys=self._keys(person), args=[task_id, _ms(lease), most]))

    def park(self, person: str, task_id: str, lease: float, message: str, tag: str | None,
             most: int = MAX_ENTRIES) -> Turn:
        """As :meth:`claim`; but while another task holds the turn, park ``message`` (a whole kombu message
        that runs ``task_id`` again) under the person and acknowledge ``tag``, in the same step."""
        keys = [*self._keys(person), f"{self.base}:parked:{person}", UNACKED, UNACKED_INDEX, self.held]
        return turn_from_reply(self._park(keys=keys, args=[task_id, _ms(lease), most, message, tag or "", person]))

    def finish(self, person: str, task_id: str, done: Iterable[str] = (), dead: dict[str, str] | None = None,
               go_on: bool = False, lease: float = 0.0, most: int = MAX_ENTRIES, ack: str | None = None) -> Turn:
        """Remove ``done`` calls from the person's order (``dead``: task id -> how it ended, for the messages
        still to come); then, with ``go_on``, keep the turn for the calls left (CLAIMED with them), else give
        it up and unpark the person's parked messages ("released"). ``ack``: also acknowledge that delivery
        tag (remove kombu's record of the held message), in the same step."""
        return turn_from_reply(self.finish_call(person, task_id, done, dead, go_on, lease, most, ack)())

    def finish_call(self, person: str, task_id: str, done: Iterable[str] = (), dead: dict[str, str] | None = None,
                    go_on: bool = False, lease: float = 0.0, most: int = MAX_ENTRIES,
                    ack: str | None = None) -> ScriptCall:
        """:meth:`finish`'s script call, to be made later (with the message's acknowledgement: its reply is
        not needed there) or together with others (:func:`worker.scripts.run_together`)."""
        done = list(done)
        pairs = [x for item in (dead or {}).items() for x in item]
        keys = [*self._keys(person), f"{self.base}:parked:{person}", self.queue, self.held, UNACKED, UNACKED_INDEX]
        args = [task_id, _ms(lease), most, "1" if go_on else "0", person, ack or "", len(done), *done, *pairs]
        return ScriptCall(self._finish, keys, args)

    def extend(self, person: str, task_id: str, lease: float) -> bool:
        """The holder keeps its turn ``lease`` seconds from now (a retry waiting for its time)."""
        return bool(self._extend(keys=[f"{self.base}:turn:{person}"], args=[task_id, _ms(lease)]))

    def sweep(self, older_than: float, most: int = 100) -> int:
        """Unpark people whose turn nobody holds (a lost lease); returns how many."""
        return int(self._sweep(keys=[self.held, self.queue], args=[self.base, older_than, most]))

    def held_people(self) -> int:
        """People with calls parked behind another of their calls (delivering or waiting to retry)."""
        return int(self.client.zcard(self.held))

    def pending(self) -> int:
        """Calls of this vendor still in some person's order."""
        return int(self.client.hlen(self.events))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
