"""kombu's Redis transport, hardened: a message a worker takes is never lost, and a malformed one never kills it.

Stock kombu takes a message with BRPOP and records it as unacknowledged (the
``unacked`` hash kombu restores from) in a second command. A worker that dies
between the two — SIGKILL, OOM, a frozen host — takes the message with it: it
is in neither place. Here a worker takes a message with one Lua script that
pops it and records it in the same atomic step (:data:`_TAKE`). When every
queue is empty the worker waits for one to fill with ``BLMOVE q q RIGHT RIGHT``,
which returns the tail without removing it, then takes. With one queue that
wait is as long as BRPOP's; with several it watches each for at most
:data:`WATCH_EACH` seconds in turn, and every take looks at all of them.

Stock kombu decodes each message popped from a Redis list inline; a list entry
that is not JSON, or JSON that is not a kombu envelope, raises out of the
consumer and stops the worker ("Unrecoverable error"). This transport catches
exactly those cases, stores the raw entry as a ``malformed`` dead letter (the
vendor is the queue's name) and goes on. ``celeryconfig.broker_transport``
selects it (``worker/redisconf.py`` says which).

:class:`SentinelTransport` is the same on a master that Redis Sentinels monitor:
kombu's ``SentinelChannel`` finds the master (again, after a failover) and this
module's channel takes messages from it.

Example::

    >>> from kombu import Connection
    >>> Connection("redis://127.0.0.1:6379/0", transport="worker.transport:Transport").transport_cls
    'worker.transport:Transport'
    >>> Connection("sentinel://10.0.0.1:26379/0", transport="worker.transport:SentinelTransport",
    ...            transport_options={"master_name": "mymaster",
    ...                               "sentinels": ["sentinel://10.0.0.1:26379", "sentinel://10.0.0.2:26379"]}
    ...            ).transport_cls
    'worker.transport:SentinelTransport'
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

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


def _kept_back(tag: str) -> bool:
    with _kept_lock:
        try:
            _kept.remove(tag)
            return True
        except KeyError:
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


def quarantine(queue: str, raw: str, error: str) -> None:
    """Keep a message the worker cannot even decode, as a dead letter an operator can see and purge."""
    from . import metrics
    from .deadletters import MALFORMED, DeadLetter, DeadLetterStore

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
# ARGV: now (the client's clock, as kombu's own unacked index), then each list's queue name.
# Pops the first message found and records it as held, as kombu's QoS.append does, in one step: the
# record is [message, exchange, routing key] with the message's JSON text spliced in unchanged.
# Returns {list, message, recorded (1/0)}, or false when every list is empty. Not a kombu envelope:
# returned unrecorded, for the transport to quarantine.
_TAKE = """
local n = #KEYS - 2
for i = 1, n do
  local m = redis.call('RPOP', KEYS[i])
  if m then
    local ok, d = pcall(cjson.decode, m)
    local props = ok and type(d) == 'table' and d['properties']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(tag) ~= 'string' then return {KEYS[i], m, 0} end
    local info = type(props['delivery_info']) == 'table' and props['delivery_info'] or {}
    local ex = type(info['exchange']) == 'string' and info['exchange'] or ''
    local rk = type(info['routing_key']) == 'string' and info['routing_key'] or ARGV[i + 1]
    redis.call('HSET', KEYS[n + 1], tag, '[' .. m .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']')
    redis.call('ZADD', KEYS[n + 2], ARGV[1], tag)
    return {KEYS[i], m, 1}
  end
end
return false
"""


class QoS(kombu_redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        if _kept_back(delivery_tag):
            virtual.QoS.ack(self, delivery_tag)  # forgotten here; Redis keeps it held, to be restored
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if _kept_back(delivery_tag):
            virtual.QoS.ack(self, delivery_tag)
            return
        super().reject(delivery_tag, requeue=requeue)

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.taken_and_recorded(delivery_tag):
            virtual.QoS.append(self, message, delivery_tag)  # Redis has the record already: local state only
        else:
            super().append(message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        # Where this channel's Redis is, kept for _connparams below.
        self._conninfo = connection.client
        self._recorded: set[str] = set()  # tags the take script recorded, until QoS.append sees them
        self._pending: str | None = None  # "take" or "watch": what the command on the wire is
        self._watch_next = 0
        super().__init__(connection, *args, **kwargs)

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
        _requeue_orphans(self.client)
        if self.global_keyprefix or not self.ack_emulation:
            self._pending = None
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        if self._pending == "empty":  # the last take found nothing: wait for a queue to fill
            queue = queues[self._watch_next % len(queues)]
            self._watch_next += 1
            wait = (timeout or self.brpop_timeout or 1) if len(queues) == 1 else WATCH_EACH
            args: list[Any] = ["BLMOVE", queue, queue, "RIGHT", "RIGHT", wait]
            self._pending = "watch"
        else:
            keys = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]
            names = [q for pri in self.priority_steps for q in queues]
            args = ["EVAL", _TAKE, len(keys) + 2, *keys, self.unacked_key, self.unacked_index_key,
                    repr(time.time()), *names]
            self._pending = "take"
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu's class default is None
        self.client.connection.send_command(*args)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            if self._pending in ("take", "watch"):
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
                reply = self.client.parse_response(self.client.connection,
                                                   "EVAL" if pending == "take" else "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                self._pending = None
                raise
            if pending == "watch" or not reply:
                # A watch that saw a message (or timed out) is followed by a take; a take that found
                # nothing, by a watch.
                self._pending = "empty" if pending == "take" else None
                raise kombu_redis.Empty()
            key, item, recorded = reply
            dest = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                message = loads(bytes_to_str(item))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                quarantine(dest, bytes_to_str(item), f"{type(exc).__name__}: {exc}")
                raise kombu_redis.Empty() from None
            if recorded:
                tag = message["properties"]["delivery_tag"]
                if not _is_envelope(message):  # quarantined by _deliver: nothing holds it
                    self.qos._remove_from_indices(tag).execute()
                else:
                    self._recorded.add(tag)
            self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu's class default is False
            self._flush_brpop_reauth()


class Transport(kombu_redis.Transport):
    Channel = Channel

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
