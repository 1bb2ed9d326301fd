"""kombu's Redis transport, hardened: a message a worker takes is never lost, and a malformed one never kills it.

Stock kombu takes a message with BRPOP and records it as unacknowledged (the
``unacked`` hash kombu restores from) in a second command. A worker that dies
between the two — SIGKILL, OOM, a frozen host — takes the message with it: it
is in neither place. Here a worker takes messages with one Lua script that
pops each and records it in the same atomic step (:data:`_TAKE`): up to
:data:`TAKE_MOST` in one round trip, within the prefetch window and each queue's
bulkhead room (:mod:`worker.broker.bulkhead`), one queue's at a time in turn, and one
at a time of a vendor whose rate limit binds (:func:`worker.limits.throttle.room`). When every
queue is empty the worker waits for one to fill with ``BLMOVE q q RIGHT RIGHT``,
which returns the tail without removing it, then takes. With one queue that
wait is as long as BRPOP's; with several it watches each for at most
:data:`WATCH_EACH` seconds in turn, and every take looks at all of them. A
worker of several queues keeps to :data:`WATCH_EACH` also while the queue gate
(:mod:`worker.broker.gate`: a throttle pause, an open breaker, the bulkhead)
leaves it one queue to take: a queue the gate gives back is taken within that
time, not after a long wait on the other one.

Stock kombu decodes each message popped from a Redis list inline; a list entry
that is not JSON, or JSON that is not a kombu envelope, raises out of the
consumer and stops the worker ("Unrecoverable error"). This transport catches
exactly those cases, stores the raw entry as a ``malformed`` dead letter (the
vendor is the queue's name) and goes on. ``celeryconfig.broker_transport``
selects it (``worker/redisconf.py`` says which).

**A full Redis** (``maxmemory`` reached, ``noeviction``) refuses every command that adds memory
(``OOM command not allowed``, redis-py's ``OutOfMemoryError``) but still answers reads, deletes and
blocking pops. Stock kombu died of it: its ack is ``MULTI ZREM HDEL EXEC``, and Redis refuses every
command queued in a MULTI while over maxmemory, deletes included; the error is no connection error,
so it rose out of the event loop ("Unrecoverable error") and the worker process exited. Here:

- an ack (:data:`_ACK`) is one script of two deletes, which Redis runs at maxmemory (and which frees);
- a take writes its record before it pops (:data:`_TAKE`): on a full Redis it is refused whole and the
  message stays on its queue; the consumer logs ``Redis is full: maxmemory reached`` once, waits
  :data:`FULL_PAUSE` with a ``BRPOP`` on a key nothing writes (blocking pops are allowed at maxmemory;
  ``BLMOVE``, the empty-queue watch, is not) and takes again, until Redis has room;
- a delivery whose outcome Redis cannot record (its retry, its dead letter) is never acknowledged: the
  task rejects it with requeue (``worker.broker.tasks.RedisFull``), and a requeue — kombu's WATCH/MULTI/EXEC that
  moves the message from the ``unacked`` hash back onto its queue — is refused whole by a full Redis. The
  channel then leaves it held (its record in ``unacked``) and forgets it locally, so it is delivered
  again: as soon as Redis takes writes again (:meth:`Channel._restore_kept`), at the latest after
  ``BROKER_VISIBILITY_TIMEOUT`` like a dead worker's. A throttled requeue refused the same way stays held
  the same way, and kombu's restore scans (a SET NX lock, then pushes) just wait for room.

Celery's own settings cannot do this: with ``acks_late``, a task that raised is acknowledged
(``task_acks_on_failure_or_timeout``) or, with that setting off, rejected without requeue — and kombu's
Redis ``QoS.reject(requeue=False)`` deletes the record just as an ack does.

:class:`SentinelTransport` is the same on a master that Redis Sentinels monitor:
kombu's ``SentinelChannel`` finds the master (again, after a failover) and this
module's channel takes messages from it.

Example::

    >>> from kombu import Connection
    >>> Connection("redis://127.0.0.1:6379/0", transport="worker.broker.transport:Transport").transport_cls
    'worker.broker.transport:Transport'
    >>> Connection("sentinel://10.0.0.1:26379/0", transport="worker.broker.transport:SentinelTransport",
    ...            transport_options={"master_name": "mymaster",
    ...                               "sentinels": ["sentinel://10.0.0.1:26379", "sentinel://10.0.0.2:26379"]}
    ...            ).transport_cls
    'worker.broker.transport:SentinelTransport'
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.eventio import READ
from kombu.utils.json import dumps, loads

from .. import scripts
from ..delivery import ordering
from ..redisconf import REDIS_FULL
from ..scripts import ScriptCall
from ..settings import get_settings

log = logging.getLogger(__name__)

#: Errors that mean Redis went away while a popped message was being recorded as unacknowledged.
LOST_REDIS = (redis.ConnectionError, redis.TimeoutError, OSError)

# Messages popped from a queue whose unacked record could not be written because Redis went away at
# that moment: they exist only here, so they go back on their queue once Redis answers again.
_orphans: list[tuple[str, Any]] = []
_orphans_lock = threading.Lock()

# Delivery tags whose message stays in Redis' unacked record when its task ends: the task could not write a
# record of what became of it (Redis full or away), so kombu's restore hands it on after the visibility timeout.
_kept: set[str] = set()
_kept_lock = threading.Lock()


def keep_unacked(tag: str | None) -> None:
    """When the task of message ``tag`` ends, do not acknowledge (nor reject) it in Redis: it comes back."""
    if tag:
        with _kept_lock:
            _kept.add(tag)


# Delivery tags whose acknowledgement is a function of the task's (a delivery's end and its ack in one round
# trip: worker/delivery/ordering.py PersonLog.finish_call with ``ack``).
_acks: dict[str, ScriptCall] = {}


def ack_with(tag: str, ack: ScriptCall) -> None:
    """Acknowledge message ``tag`` by making the script call ``ack`` (which removes kombu's record of it) instead
    of kombu's own two commands. If it fails, the message stays held in Redis and comes back after the visibility
    timeout (at least once: what it recorded is redone). On the event loop's thread (the threads pool) the
    acknowledgements of one turn of the loop go together, in one round trip (:meth:`QoS.flush_acks`)."""
    with _kept_lock:
        _acks[tag] = ack


# Delivery tags whose message a script of its task acknowledged already (:func:`acked`): the consumer's ack (or
# reject) of it only settles it locally. (Celery acknowledges on its consumer's thread. Acknowledging a delivery's
# end in its own task's thread instead cost more CPU per delivery, not less: 1.36-1.86 ms against 1.32-1.56 ms in
# interleaved drains of 6,000 on 2026-12-07, as each pool thread then lets go of the GIL once more.)
_acked: set[str] = set()


def acked(tag: str | None) -> None:
    """Message ``tag``'s record is gone from Redis already (a script of its task removed it: the retry schedule's
    add, a park): the consumer's ack of it only settles it locally, without a round trip of its own."""
    if tag:
        with _kept_lock:
            _acked.add(tag)


def _marked(tags: set[str], tag: str) -> bool:
    """Whether ``tag`` was in ``tags`` (:data:`_kept`, :data:`_acked`); it is taken out (once)."""
    with _kept_lock:
        if tag in tags:
            tags.discard(tag)
            return True
        return False


#: kombu's Redis channel internals this transport overrides or calls; missing from other kombu versions.
KOMBU_INTERNALS = ("_brpop_start", "_brpop_read", "_brpop_sent_at", "_flush_brpop_reauth", "_in_poll",
                   "_q_for_pri")
#: The kombu versions whose internals these are (pyproject.toml pins the same range).
KOMBU_VERSIONS = ((5, 7), (5, 8))


def check_kombu() -> None:
    """Raise RuntimeError, saying what to install, when the installed kombu is not one this transport knows."""
    import kombu

    version = tuple(int(part) for part in kombu.__version__.split(".")[:2])
    missing = [name for name in KOMBU_INTERNALS if not hasattr(kombu_redis.Channel, name)]
    low, high = KOMBU_VERSIONS
    if missing or not low <= version < high:
        raise RuntimeError(
            f"kombu {kombu.__version__} is installed; this worker's Redis transport needs kombu "
            f">={low[0]}.{low[1]},<{high[0]}.{high[1]}" + (f" (missing: {', '.join(missing)})" if missing else "")
            + ": pip install -c requirements.lock -e . (or 'kombu>=5.7,<5.8')")


#: Keys every kombu message envelope has.
ENVELOPE_KEYS = ("body", "properties", "headers")

#: Seconds the consumer waits before it tries to take again from a full Redis.
FULL_PAUSE = 0.5
#: The key the consumer waits on (BRPOP, with FULL_PAUSE as its timeout) while Redis is full; nothing writes it.
PAUSE_KEY = "vdw.transport.redis-full.pause"


class _Fullness:
    """This process's view of a full Redis, so that an episode is logged once (and its end once)."""

    def __init__(self) -> None:
        self._since: float | None = None
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        return self._since is not None

    def seen(self, exc: BaseException) -> None:
        """Redis refused a write for maxmemory."""
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        log.warning("%s (%s): taking no messages until it has room (trying again every %gs); deliveries "
                    "whose outcome cannot be recorded stay held and are delivered again", REDIS_FULL, exc, FULL_PAUSE)

    def room(self) -> None:
        """Redis took a write."""
        with self._lock:
            if self._since is None:
                return
            since, self._since = self._since, None
        log.warning("Redis has room again after %.1fs: taking messages", time.monotonic() - since)


#: The worker process's view: the consumer and the delivery threads share it.
FULLNESS = _Fullness()


def quarantine(queue: str, raw: str, error: str) -> None:
    """Keep a message the worker cannot even decode, as a dead letter an operator can see and purge."""
    from .. import metrics
    from ..delivery.deadletters import DeadLetter, DeadLetterStore
    from ..errors import MALFORMED

    log.error("malformed message on queue %s dead-lettered: %s", queue, error)
    try:
        DeadLetterStore.default().add(
            DeadLetter(vendor=queue, operation=None, reason=MALFORMED, attempts=0, event_id=None,
                       error=f"not a message: {error}", raw=raw)
        )
        metrics.record(queue, metrics.DEAD_LETTERED, MALFORMED)
    except Exception:  # never let bookkeeping of garbage stop the consumer
        log.exception("could not store the malformed message from %s: %r", queue, raw[:200])


def _is_envelope(message: Any) -> bool:
    return (
        isinstance(message, dict)
        and all(k in message for k in ENVELOPE_KEYS)
        and isinstance(message["properties"], dict)
        and isinstance(message["headers"], dict)
        and isinstance(message["properties"].get("delivery_info", {}), dict)
    )


#: With several queues to watch and all of them empty, each is watched this long in turn (a message on
#: another queue waits at most this long); with one queue, kombu's ``brpop_timeout``.
WATCH_EACH = 0.1

# KEYS: the lists to take from in order (kombu's priority keys for each queue), then unacked, unacked_index.
# ARGV: now (the client's clock, as kombu's own unacked index), the key prefix, the turn's lease (ms), the most
# messages to take, then each list's queue name, then each list's room (the most messages of its queue to take,
# -1 for no cap; the first message found is taken whatever its queue's room).
# Takes up to that many messages, in passes over the lists: each pass takes at most one message per queue (the
# first of its lists, in priority order, that has one), so one queue's backlog never crowds out another's; a
# pass that finds nothing ends it. Each message is recorded as held, as kombu's QoS.append does, in the same
# step: the record is [message, exchange, routing key] with the message's JSON text spliced in unchanged.
# Returns {{list, message, recorded (1/0), claim...}, ...}, or false when every list is empty. Not a kombu
# envelope: popped and returned unrecorded, for the transport to quarantine.
#
# The order matters on a full Redis. Redis does not roll a script back; it checks maxmemory at the
# script's first write only: a command that adds memory (HSET, ZADD, LPUSH: "deny-oom") is refused if it
# is the script's first write, and once anything was written (even an RPOP of an empty list) the rest
# runs past maxmemory. Popping first, as before, meant the take always went through on a full Redis
# (a record written past maxmemory, and the worker went on taking work whose outcome it could not write).
# So the first message is read (LINDEX), recorded (HSET: the first write; refused whole when Redis is full,
# nothing changed, the message still on its queue), and only then popped (RPOP of the same, tail, element).
# A take that went through runs whole: at most TAKE_MOST records written past maxmemory by a Redis that
# filled up in this very step.
#
# A delivery kept in its person's order (``vdw_order`` header: worker/delivery/ordering.py) is claimed for its person
# in the same step (``vdw_claim``, ARGV: the key prefix and the turn's lease): the claim's answer follows the
# record flag, and the task starts from it instead of asking Redis again.
_TAKE = ordering.CLAIM_FN + """
local n = #KEYS - 2
local most = tonumber(ARGV[4])
local room = {}
for i = 1, n do
  local q = ARGV[i + 4]
  local r = tonumber(ARGV[n + i + 4])
  if room[q] == nil then room[q] = (r == nil or r < 0) and most or r end
end
local out = {}
local function take(i, queue, m)
  local ok, d = pcall(cjson.decode, m)
  local props = ok and type(d) == 'table' and d['properties']
  local tag = type(props) == 'table' and props['delivery_tag']
  if type(tag) ~= 'string' then
    redis.call('RPOP', KEYS[i])
    return {KEYS[i], m, 0}
  end
  local info = type(props['delivery_info']) == 'table' and props['delivery_info'] or {}
  local ex = type(info['exchange']) == 'string' and info['exchange'] or ''
  local rk = type(info['routing_key']) == 'string' and info['routing_key'] or queue
  redis.call('HSET', KEYS[n + 1], tag, '[' .. m .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']')
  redis.call('ZADD', KEYS[n + 2], ARGV[1], tag)
  redis.call('RPOP', KEYS[i])
  room[queue] = room[queue] - 1
  local entry = {KEYS[i], m, 1}
  local h = type(d['headers']) == 'table' and d['headers'] or {}
  local person, task = h['vdw_order'], h['id']
  if type(person) == 'string' and type(task) == 'string' then
    local base = ARGV[2] .. ':order:' .. queue
    local claim = vdw_claim(base .. ':' .. person, base .. ':events', base .. ':turn:' .. person,
                            base .. ':outcome', task, ARGV[3], ordering_most)
    for j = 1, #claim do entry[#entry + 1] = claim[j] end
  end
  return entry
end
while #out < most do
  local pass = {}
  local found = false
  for i = 1, n do
    local queue = ARGV[i + 4]
    if #out < most and not pass[queue] and (room[queue] > 0 or #out == 0) then
      local m = redis.call('LINDEX', KEYS[i], -1)
      if m then
        pass[queue] = true
        found = true
        out[#out + 1] = take(i, queue, m)
      end
    end
  end
  if not found then break end
end
if #out == 0 then return false end
return out
""".replace("ordering_most", str(ordering.MAX_ENTRIES))

#: The most messages one take brings (one round trip), within the prefetch window's and each queue's room.
TAKE_MOST = 16

#: What caps how many more messages of a queue this worker process takes now, each answering a number or None
#: (no cap): the bulkhead's room (:meth:`worker.broker.bulkhead.Bulkhead.room`), the throttle's (none while a
#: vendor's rate limit binds: :func:`worker.limits.throttle.room`). :func:`add_room` adds one.
_rooms: list[Callable[[str], int | None]] = []


def add_room(room: Callable[[str], int | None]) -> None:
    """Cap each take of a queue by ``room(queue)`` (None: no cap), besides the prefetch window and :data:`TAKE_MOST`."""
    if room not in _rooms:
        _rooms.append(room)


def room(queue: str) -> int | None:
    """How many more messages of ``queue`` a take may bring now: the least of every cap (None: none caps it)."""
    caps = [n for r in _rooms if (n := r(queue)) is not None]
    return min(caps) if caps else None


def take_args(keys: list[str], names: list[str], unacked: str, unacked_index: str, most: int,
              rooms: list[int | None] | None = None) -> list[Any]:
    """The ``EVAL`` of :data:`_TAKE`: up to ``most`` messages from ``keys`` (lists of the queues ``names``), each
    queue's at most its ``rooms`` entry (None: no cap)."""
    s = get_settings()
    caps = ["-1" if r is None else str(r) for r in (rooms or [None] * len(keys))]
    return ["EVAL", _TAKE, len(keys) + 2, *keys, unacked, unacked_index, repr(time.time()), s.key_prefix,
            int(s.visibility_timeout * 1000), most, *names, *caps]

#: Claims the take made, by delivery tag, until the task takes its own (:func:`take_claim`).
_claims: dict[str, ordering.Turn] = {}


def take_claim(tag: str | None) -> ordering.Turn | None:
    """The claim of its person's turn that the take of message ``tag`` made, if it made one (once)."""
    if not tag:
        return None
    with _kept_lock:
        return _claims.pop(tag, None)

# KEYS: unacked_index, unacked. ARGV: the delivery tag. kombu's ack (the same two deletes) in one script
# instead of MULTI/EXEC: Redis refuses every command queued in a MULTI while over maxmemory, deletes too,
# but runs a script whose commands free memory.
_ACK = """
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('HDEL', KEYS[2], ARGV[1])
"""


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Held messages whose delivery ended here without a record of its outcome: (tag, score of its record
        # in the unacked index), to put back on their queue as soon as Redis takes writes (Channel._restore_kept).
        self.kept: list[tuple[str, float | None]] = []
        # Acknowledgements by script made on the event loop's thread and not sent yet: (tag, call).
        self._ack_batch: list[tuple[str, ScriptCall]] = []

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.taken_and_recorded(delivery_tag):
            virtual.QoS.append(self, message, delivery_tag)  # Redis has the record already: local state only
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if _marked(_kept, delivery_tag):  # its task could not record what became of it: held, delivered again
            self._keep(delivery_tag)
            return
        if _marked(_acked, delivery_tag):  # its task removed the record already
            self._settled(delivery_tag)
            return
        with _kept_lock:
            ack = _acks.pop(delivery_tag, None)
        if ack is not None:
            self._acks_with(delivery_tag, ack)
            return
        try:
            with self.channel.conn_or_acquire() as client:  # a pooled connection, as kombu's own ack
                client.eval(_ACK, 2, self.unacked_index_key, self.unacked_key, delivery_tag)
        except redis.OutOfMemoryError as exc:  # not from two deletes; if ever: held, delivered again later
            FULLNESS.seen(exc)
            self._keep(delivery_tag)
            return
        self._settled(delivery_tag)

    def _acks_with(self, delivery_tag: str, ack: ScriptCall) -> None:
        """Acknowledge with the delivery's own script (its end recorded in the same step): at once, or, on the
        event loop's thread, with the loop's next turn, together with the others of this one."""
        loop = self.channel.connection.loop_here()
        if loop is not None:
            self._ack_batch.append((delivery_tag, ack))
            if len(self._ack_batch) == 1:
                loop.call_soon(self.flush_acks)
            return
        try:
            reply = ack()
        except Exception as exc:  # noqa: BLE001 - Redis full or away, or anything: held, delivered again
            reply = exc
        self._acked_with(delivery_tag, reply)

    def flush_acks(self) -> None:
        """Make the acknowledgements gathered on the event loop's thread, in one round trip. (The consumer's
        one thread makes every acknowledgement of the threads pool; one round trip each, while a hundred pool
        threads wait for the GIL too, was what bounded a worker with slow vendors.)"""
        batch, self._ack_batch = self._ack_batch, []
        if not batch:
            return
        try:
            replies = scripts.run_together([call for _, call in batch])
        except Exception as exc:  # noqa: BLE001 - it returns Redis' errors; anything else: each held, delivered again
            replies = [exc] * len(batch)
        for (tag, _), reply in zip(batch, replies, strict=True):
            self._acked_with(tag, reply)

    def _acked_with(self, delivery_tag: str, reply: object) -> None:
        if isinstance(reply, Exception):  # Redis full or away (or a bug): held, delivered again (its record redone)
            if isinstance(reply, redis.OutOfMemoryError):
                FULLNESS.seen(reply)
            log.warning("could not acknowledge %s with its delivery's end (%s); it stays held and comes back",
                        delivery_tag, reply)
            self._keep(delivery_tag)
            return
        self._settled(delivery_tag)

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        self.flush_acks()  # shutting down: what ended here is acknowledged, not restored and delivered again
        return super().restore_unacked_once(stderr)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if _marked(_acked, delivery_tag):  # its task acknowledged it: nothing to put back
            self._settled(delivery_tag)
            return
        with _kept_lock:
            ack = _acks.pop(delivery_tag, None)
        if ack is not None:  # the delivery ended (recorded with the ack): nothing to put back
            self._acks_with(delivery_tag, ack)
            return
        if not requeue:
            return self.ack(delivery_tag)
        try:
            self.restore_by_tag(delivery_tag, leftmost=True)  # WATCH/MULTI/EXEC: refused whole when full
        except redis.OutOfMemoryError as exc:
            FULLNESS.seen(exc)
            self._keep(delivery_tag)
            return
        self._settled(delivery_tag)

    def _settled(self, tag: str) -> None:
        """The message ``tag`` is done here (kombu's local state). When that frees the prefetch window, a consumer
        without an event loop is woken: it stopped taking messages while the window was full (:class:`Poller`)."""
        full = not self.can_consume()
        virtual.QoS.ack(self, tag)
        if full:
            cycle = getattr(self.channel.connection, "cycle", None)
            if isinstance(cycle, Poller):
                cycle.wake()

    def _keep(self, tag: str) -> None:
        """Done here, still held in Redis (its record in the unacked hash): delivered again later."""
        try:  # a read, which a full Redis answers: which record is ours (a restored and re-taken one is not)
            with self.channel.conn_or_acquire() as client:
                score = client.zscore(self.unacked_index_key, tag)
        except redis.RedisError:
            score = None  # kombu's restore after the visibility timeout brings it back
        self.kept.append((tag, score))
        self._settled(tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().restore_visible(*args, **kwargs)
        except redis.OutOfMemoryError as exc:  # its lock (SET NX) and the pushes wait for room
            FULLNESS.seen(exc)

    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)
        except redis.OutOfMemoryError as exc:  # at shutdown: held, delivered again after the visibility timeout
            FULLNESS.seen(exc)
            log.warning("%s: %s message(s) this worker held stay recorded in Redis and are delivered again "
                        "after the visibility timeout", REDIS_FULL, len(self._delivered))
            self._delivered.clear()


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        # Where this channel's Redis is, kept for _connparams below.
        self._conninfo = connection.client
        self._recorded: set[str] = set()  # tags the take script recorded, until QoS.append sees them
        # What the command on the wire is: "take", "watch" or "pause" (while Redis is full); None, "empty"
        # (the last take found nothing: watch next) or "full" (pause next) between commands.
        self._pending: str | None = None
        self._watch_next = 0
        self._consumed: set[str] = set()  # every queue this channel has consumed, stopped ones included
        super().__init__(connection, *args, **kwargs)

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        self._consumed.add(queue)
        return super().basic_consume(queue, *args, **kwargs)

    def taken_and_recorded(self, tag: str) -> bool:
        try:
            self._recorded.remove(tag)
            return True
        except KeyError:
            return False

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # When Redis goes away, Celery closes the lost connection twice: collect(), which ends by
        # setting Transport.client to None, then close(), whose channel.close() restores the unacked
        # messages through a new pool built from Transport.client -> AttributeError, "Unrecoverable
        # error", the worker exits. Running deliveries ack through the same path. Give the channel its
        # Redis address back so those calls reach Redis (or fail with a connection error kombu handles).
        if self.connection.client is None and self._conninfo is not None:
            self.connection.client = self._conninfo
        return super()._connparams(asynchronous=asynchronous)

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self._pending != "full":
            try:
                _requeue_orphans(self.client)
                self._restore_kept()
            except redis.OutOfMemoryError as exc:
                FULLNESS.seen(exc)
                self._pending = "full"
        if self.global_keyprefix or not self.ack_emulation:
            self._pending = None
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        if self._pending == "full":  # Redis refused the last take or watch: wait a moment (allowed when full)
            args: list[Any] = ["BRPOP", PAUSE_KEY, FULL_PAUSE]
            self._pending = "pause"
        elif self._pending == "empty":  # the last take found nothing: wait for a queue to fill
            queue = queues[self._watch_next % len(queues)]
            self._watch_next += 1
            # One queue to watch for long only if it is the only one: another may be given back any moment.
            wait = (timeout or self.brpop_timeout or 1) if len(self._consumed) <= 1 else WATCH_EACH
            args = ["BLMOVE", queue, queue, "RIGHT", "RIGHT", wait]
            self._pending = "watch"
        else:
            keys = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]
            names = [q for pri in self.priority_steps for q in queues]
            window = self.qos.can_consume_max_estimate()
            most = max(1, min(TAKE_MOST, TAKE_MOST if window is None else window))
            rooms = None
            if most > 1 and _rooms:
                caps = {q: room(q) for q in queues}  # once per queue: names repeats each per priority step
                rooms = [caps[q] for q in names]
            args = take_args(keys, names, self.unacked_key, self.unacked_index_key, most, rooms)
            self._pending = "take"
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu's class default is None
        self.client.connection.send_command(*args)

    def maybe_refresh_binding_expiry(self) -> None:
        try:
            super().maybe_refresh_binding_expiry()
        except redis.OutOfMemoryError as exc:  # kombu logs a traceback a second; the episode is logged once
            FULLNESS.seen(exc)

    def _restore_kept(self) -> None:
        """Put back on their queues the held messages whose outcome Redis could not record, now that it may
        have room (refused whole while it has not: they wait, OutOfMemoryError)."""
        kept = self.qos.kept
        while kept:
            tag, score = kept[0]
            if score is not None and self._restore_if_held(tag, score):
                log.info("a delivery held while Redis was full is back on its queue (tag %s)", tag)
            kept.pop(0)

    def _restore_if_held(self, tag: str, score: float) -> bool:
        """kombu's ``restore_by_tag`` (the record back onto its queue as its requeue does, in one
        WATCH/MULTI/EXEC), but only while the record is still the one this worker took (the same score in the
        unacked index): after the visibility timeout another worker may have restored it, and a third taken it
        again under the same tag."""
        restored = False

        def restore(pipe: Any) -> None:
            nonlocal restored
            restored = False
            if pipe.zscore(self.unacked_index_key, tag) != score:
                return  # gone (restored by kombu, acknowledged) or taken again: not ours to move
            record = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self.qos._remove_from_indices(tag, pipe)
            if record:
                message, exchange, routing_key = loads(bytes_to_str(record))
                self._do_restore_message(message, exchange, routing_key, pipe, True)
                restored = True

        with self.conn_or_acquire() as client:
            client.transaction(restore, self.unacked_key, self.unacked_index_key)
        return restored

    def _brpop_read(self, **options: Any) -> bool:
        try:
            if self._pending in ("take", "watch", "pause"):
                return self._take_read(**options)
            return super()._brpop_read(**options)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            items = getattr(self._queue_cycle, "items", None) or ["?"]
            raw = exc.doc if isinstance(exc, json.JSONDecodeError) else repr(exc.object[:4096])
            quarantine(str(items[-1]), raw, f"{type(exc).__name__}: {exc}")
            raise kombu_redis.Empty() from None

    def _take_read(self, **options: Any) -> bool:
        pending = self._pending
        try:
            try:
                command = {"take": "EVAL", "watch": "BLMOVE", "pause": "BRPOP"}[pending or "take"]
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                self._pending = None
                raise
            except redis.OutOfMemoryError as exc:  # the take or the watch refused whole: nothing changed
                FULLNESS.seen(exc)
                self._pending = "full"
                raise kombu_redis.Empty() from None
            if pending == "pause":
                self._pending = None  # take again
                raise kombu_redis.Empty()
            if pending == "watch" or (reply and any(entry[2] for entry in reply)):
                FULLNESS.room()  # Redis took a write: a record, or a watch (refused when full)
            if pending == "watch" or not reply:
                # A watch that saw a message (or timed out) is followed by a take; a take that found
                # nothing, by a watch.
                self._pending = "empty" if pending == "take" else None
                raise kombu_redis.Empty()
            # Every message the take brought is handed on, even if one of them fails to be: each is recorded
            # as held, and one left out would wait for the visibility timeout. The first failure is raised after.
            delivered, failure = False, None
            for key, item, recorded, *claim in reply:
                try:
                    delivered = self._take_one(bytes_to_str(key), item, recorded, claim) or delivered
                except Exception as exc:  # noqa: BLE001 - raised below, once the rest are handed on
                    failure = failure or exc
            if failure is not None:
                raise failure
            if not delivered:
                raise kombu_redis.Empty()
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu's class default is False
            self._flush_brpop_reauth()

    def _take_one(self, key: str, item: bytes, recorded: int, claim: list[Any]) -> bool:
        """Hand one taken message to its consumer; False if it was quarantined instead."""
        dest = key.rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(dest)
        try:
            message = loads(bytes_to_str(item))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            quarantine(dest, bytes_to_str(item), f"{type(exc).__name__}: {exc}")
            return False
        if recorded:
            tag = message["properties"]["delivery_tag"]
            if not _is_envelope(message):  # quarantined by _deliver: nothing holds it
                self.qos._remove_from_indices(tag).execute()
            else:
                self._recorded.add(tag)
                if claim:
                    with _kept_lock:
                        _claims[tag] = ordering.turn_from_reply(claim)
        self.connection._deliver(message, dest)
        return True


class Poller(kombu_redis.MultiChannelPoller):
    """kombu's poller of the worker's channels, made for a consumer without Celery's event loop (a green pool's:
    :mod:`worker.broker.green`), which waits in ``drain_events`` for up to 2 s at a time.

    - Restores of unacknowledged messages run at most every :attr:`restore_every` seconds. With the event loop
      kombu restores on a timer; without it, after every poll that brought nothing (many times a second on an
      idle worker) and never on a busy one: there the worker's timer restores, at this pace.
    - :meth:`wake` (after :meth:`enable_wakeups`) ends the consumer's wait at once (``socket.timeout``, which
      Celery's loop takes as "nothing came"): the consumer then runs what it was asked to do (the queue gate's
      pause, hold, resume) and takes messages again when a delivery ending freed the prefetch window — without
      it, a queue given back or a window freed waited for the end of that wait.
    """

    #: Seconds between restores, None: every call (kombu's own pace; its event loop's timer calls it).
    restore_every: float | None = None
    _restored = -float("inf")
    _waker: tuple[socket.socket, socket.socket] | None = None
    _woken = False

    def maybe_restore_messages(self) -> Any:
        if self.restore_every is not None:
            now = time.monotonic()
            if now - self._restored < self.restore_every:
                return None
            self._restored = now
        return super().maybe_restore_messages()

    def enable_wakeups(self) -> None:
        """Let :meth:`wake` end the consumer's wait (a consumer without the event loop, whose poller this is)."""
        if self._waker is None:
            pair = socket.socketpair()
            for end in pair:
                end.setblocking(False)
            self.poller.register(pair[0], READ)
            self._waker = pair

    def wake(self) -> None:
        """End the consumer's current wait for messages (from any thread or greenlet; no-op without wakeups)."""
        waker = self._waker
        if waker is not None:
            try:
                waker[1].send(b"w")
            except OSError:  # full (a wake-up is pending anyway) or closed
                pass

    def handle_event(self, fileno: int, event: int) -> Any:
        waker = self._waker
        if waker is not None and fileno == waker[0].fileno():
            try:
                while waker[0].recv(4096):
                    pass
            except OSError:  # drained
                pass
            self._woken = True
            return None
        return super().handle_event(fileno, event)

    def get(self, callback: Any, timeout: float | None = None) -> Any:
        try:
            return super().get(callback, timeout)
        except kombu_redis.Empty:
            if self._woken:
                self._woken = False
                raise TimeoutError() from None  # socket.timeout: Celery's loop takes it as "nothing came"
            raise

    def close(self) -> None:
        waker, self._waker = self._waker, None
        if waker is not None:
            try:
                self.poller.unregister(waker[0])
            except (KeyError, OSError, ValueError):
                pass
            for end in waker:
                end.close()
        super().close()


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()  # type: ignore[assignment]  # kombu's base class types it as the virtual FairCycle
        self._loop: Any = None
        self._loop_thread: int | None = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self._loop, self._loop_thread = loop, threading.get_ident()  # the consumer's thread runs its loop
        super().register_with_event_loop(connection, loop)

    def loop_here(self) -> Any:
        """The event loop this transport polls with, if the caller runs on its thread (else None)."""
        return self._loop if self._loop_thread == threading.get_ident() else None

    def _deliver(self, message: Any, queue: str) -> None:
        if not _is_envelope(message):
            quarantine(queue, dumps(message) if not isinstance(message, str) else message, "not a kombu envelope")
            return
        try:
            super()._deliver(message, queue)
        except LOST_REDIS:
            # BRPOP took the message, then recording it as unacked failed: nothing ran it and Redis
            # no longer has it. Keep it; the next poll after reconnecting puts it back.
            with _orphans_lock:
                _orphans.append((queue, message))
            log.warning("Redis went away while taking a message from %s; it goes back once Redis answers", queue)
            raise


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """:class:`Channel` on the master the Sentinels name: kombu's ``SentinelChannel`` makes the connection
    pools (each new connection asks the Sentinels where the master is), this module's channel takes, waits and
    quarantines as above. Transport options: ``master_name``, ``sentinel_kwargs``, ``sentinels``
    (``redisconf.RedisTarget.celery`` sets them).

    kombu reads the Sentinels from a broker URL listing them all (``sentinel://h1;sentinel://h2``), but a
    kombu Connection given several URLs fails over to the next one by re-reading it — transport included,
    so a worker would go on with kombu's stock transport (BRPOP, and a message lost with a worker killed at
    the wrong moment). So the broker URL names one Sentinel and the ``sentinels`` option all of them.
    """

    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options, "sentinels")  # type: ignore[assignment]  # kombu types it by its own tuple's length
    #: ``sentinel://host:port`` of every Sentinel.
    sentinels: tuple[str, ...] = ()

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        if not self.sentinels:
            return super()._sentinel_managed_pool(asynchronous)
        if self.connection.client is None and self._conninfo is not None:
            self.connection.client = self._conninfo  # see Channel._connparams
        # kombu reads the Sentinels from the kombu Connection's alternates: show it, for this one call and this
        # channel only, a Connection whose alternates are the Sentinels (the real one is shared: never changed).
        transport = self.connection
        self.connection = _Override(transport, client=_Override(transport.client, alt=list(self.sentinels)))
        try:
            return super()._sentinel_managed_pool(asynchronous)
        finally:
            self.connection = transport


class _Override:
    """``obj`` with some attributes replaced; everything else is read from ``obj``."""

    def __init__(self, obj: Any, **replaced: Any) -> None:
        self.__dict__.update(replaced, _obj=obj)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._obj, name)


class SentinelTransport(Transport):
    """:class:`Transport` through Redis Sentinel: a ``sentinel://h1:26379/0`` broker URL and the transport options
    ``master_name`` and ``sentinels`` (every Sentinel)."""

    default_port = 26379  # type: ignore[assignment]  # kombu's class default is None
    Channel = SentinelChannel


def _requeue_orphans(client: Any) -> None:
    with _orphans_lock:
        while _orphans:
            queue, message = _orphans[0]
            client.rpush(queue, dumps(message))  # the consuming end: it is taken next
            _orphans.pop(0)
            log.warning("put back on %s a message taken just before Redis went away", queue)
