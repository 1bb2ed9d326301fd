"""Put delivery messages on the vendor queues: one round trip, bounded, spooled when Redis is away.

A producer call fans out to up to three vendor queues. Publishing each message
through ``apply_async`` costs a web handler three Celery publishes; this module
builds compact Celery (protocol 2) messages that any Celery worker reads as it reads its own
(:mod:`worker.envelope`, without importing Celery) and sends all of them in one pipelined write to Redis.

The caller is never held longer than ``PUBLISH_TIMEOUT``. When Redis cannot
take the messages in that time they go to the local :class:`~worker.producer.spool.Spool`
and a background thread publishes them once Redis answers again. While Redis is
known to be down, calls go straight to the spool without waiting on it. If the
spool is disabled or full the call raises :class:`~worker.errors.EnqueueError`.

A Redis at ``maxmemory`` (``noeviction``) answers, but refuses the write (``OOM command not
allowed``): the event is spooled just the same, logged as what it is (``Redis is full:
maxmemory reached``, see :data:`~worker.redisconf.REDIS_FULL`), and the flusher keeps trying
until Redis has room. At the very edge Redis can take the first of an event's messages and
refuse the next: the whole event is spooled, so that vendor may get it twice (never none).

With ``PUBLISH_WAIT_REPLICAS=n`` the same write ends with Redis' ``WAIT n``: a call
counts as queued only once ``n`` replicas have its messages, so that a failover
(after which the promoted replica is all there is) cannot take an acknowledged
event with it. When fewer confirm in time the event is spooled as well — a
duplicate is possible, a loss is not — and the spool is published only while
``n`` replicas confirm.

Example::

    >>> Publisher.default().publish("5f0c...", {"id": "5f0c...", ...}, ["loops", "conveyour"])  # doctest: +SKIP
    'queued'
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError

from ..envelope import Message, TaskMessages
from ..errors import EnqueueError
from ..keys import order_commands, person_id
from ..redisconf import REDIS_FULL, config_problem, is_full
from ..settings import Settings, get_settings
from ..vendors import VENDORS
from .spool import Spool, SpoolFull

log = logging.getLogger(__name__)

#: Seconds between the spool flusher's attempts to reach Redis.
FLUSH_INTERVAL = 0.5
#: Share of PUBLISH_TIMEOUT one connect or write may take: two tries fit, with room for the spool.
ATTEMPT_SHARE = 0.4
#: Entries the flusher publishes per round before it checks on Redis again.
FLUSH_BATCH = 500

QUEUED = "queued"
SPOOLED = "spooled"

def ordered(messages: TaskMessages, payload: dict[str, Any], vendors: list[str], prefix: str,
            task_id_suffix: str = "", event_json: str | None = None) -> list[Message]:
    """As :meth:`TaskMessages.build`, each message kept in its person's order: the messages, then the writes that
    put each call in its person's order (``("", command, ...)``; :func:`_push` sends them all in one MULTI)."""
    event_json = event_json or json.dumps(payload)
    persons = {}
    for vendor in vendors:
        key = VENDORS[vendor].person_key(payload["identity"]) if vendor in VENDORS else None
        if key is not None:
            persons[vendor] = person_id(key)
    out = messages.build(payload, vendors, task_id_suffix, event_json, persons)
    for vendor, person in persons.items():
        task_id = f"{payload['id']}.{vendor}{task_id_suffix}"
        out.extend(("", *command) for command in order_commands(prefix, vendor, person, task_id, event_json))
    return out


def _lpush(queue: str, message: str) -> bytes:
    """One LPUSH in Redis's wire protocol (redis-py's general packer costs ~40 µs a call here)."""
    q, m = queue.encode(), message.encode()
    return b"*3\r\n$5\r\nLPUSH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(q), q, len(m), m)


def _pack(*args: str) -> bytes:
    """Any command in Redis's wire protocol."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


_MULTI, _EXEC = _pack("MULTI"), _pack("EXEC")


def wire(messages: list[Message], replicas: int = 0, wait_ms: int = 0) -> tuple[bytes, int]:
    """The one write that queues ``messages`` (each ``(queue, message)`` an LPUSH, each ``("", command, ...)``
    that command), and how many replies it gets before WAIT's. With any command besides LPUSHes it is one
    MULTI/EXEC: a call is in its person's order exactly when its messages are queued."""
    plain = all(m[0] for m in messages)
    body = [_lpush(m[0], m[1]) if m[0] else _pack(*m[1:]) for m in messages]
    wait = [_wait(replicas, wait_ms)] if replicas else []
    if plain:
        return b"".join([*body, *wait]), len(messages)
    return b"".join([_MULTI, *body, _EXEC, *wait]), len(messages) + 2


class NotReplicated(redis.RedisError):
    """Redis took the messages but fewer replicas than PUBLISH_WAIT_REPLICAS confirmed them in time."""


def _check_replicated(acked: int, replicas: int, wait_ms: int) -> None:
    """Raise :class:`NotReplicated` when WAIT's answer ``acked`` is fewer than ``replicas``."""
    if acked < replicas:
        raise NotReplicated(f"only {acked} of {replicas} replica(s) confirmed the event within {wait_ms} ms "
                            f"(PUBLISH_WAIT_REPLICAS={replicas})")


def _wait(replicas: int, wait_ms: int) -> bytes:
    """``WAIT replicas wait_ms`` in Redis's wire protocol."""
    r, w = str(replicas).encode(), str(wait_ms).encode()
    return b"*3\r\n$4\r\nWAIT\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(r), r, len(w), w)


def _push(client: redis.Redis, messages: list[Message], replicas: int = 0, wait_ms: int = 0) -> None:
    """Queue ``messages`` in one pipelined write on one connection (:func:`wire`, no retries); with ``replicas``,
    a ``WAIT replicas wait_ms`` in the same write, and :class:`NotReplicated` if fewer confirm."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        data, replies = wire(messages, replicas, wait_ms)
        conn.send_packed_command([data], check_health=False)
        for _ in range(replies):
            conn.read_response()
        if replicas:
            _check_replicated(conn.read_response(), replicas, wait_ms)
    except NotReplicated:
        raise
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


class Publisher:
    """Publishes fan-out messages for one process; thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.messages = TaskMessages()
        attempt = settings.publish_timeout * ATTEMPT_SHARE
        self.target = settings.redis_target()
        # Under Sentinel, finding the master shares the same budget (redisconf: split among the Sentinels).
        self.redis = self.target.client(
            socket_connect_timeout=attempt,
            socket_timeout=attempt,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        self._master_checked = False  # under Sentinel: the Sentinels were seen to monitor REDIS_SENTINEL_MASTER
        # PUBLISH_WAIT_REPLICAS: how many replicas must confirm a write, and how long Redis' WAIT may take
        # (less than the socket timeout, so that its answer arrives).
        self._replicas = settings.publish_wait_replicas
        self._wait_ms = max(1, int(attempt * 1000 * 0.8))
        self.spool = Spool(settings.spool_dir, settings.spool_max_bytes) if settings.spool_enabled else None
        self._down = False
        #: Why Redis last did not take a write (None: it did): names the cause in logs and EnqueueError.
        self.last_error: Exception | None = None
        self._lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()
        try:
            left_over = self.spool is not None and self.spool.pending()
        except OSError as exc:  # an unreadable SPOOL_DIR: calls still publish; one that must spool raises EnqueueError
            log.warning("the spool %s cannot be read: %s", settings.spool_dir, exc)
            left_over = False
        if left_over:
            self._start_flusher()  # left over from an earlier process

    _default: Publisher | None = None
    _default_pid: int | None = None
    _default_lock = threading.Lock()

    @classmethod
    def default(cls) -> Publisher:
        """The process's publisher (made anew in a forked child)."""
        with cls._default_lock:
            if cls._default is None or cls._default_pid != os.getpid():
                cls._default, cls._default_pid = cls(get_settings()), os.getpid()
            return cls._default

    @classmethod
    def reset_default(cls) -> None:
        with cls._default_lock:
            if cls._default is not None and cls._default_pid == os.getpid():
                cls._default.close()
            cls._default = None

    # -- publishing -------------------------------------------------------------

    def publish(self, payload: dict[str, Any], vendors: list[str], task_id_suffix: str = "",
                spool: bool = True, event_json: str | None = None) -> str:
        """Queue one message per vendor, or spool them (unless ``spool=False``); returns QUEUED or SPOOLED."""
        messages = self.prepare(payload, vendors, task_id_suffix, event_json)
        error = None
        if self.worth_trying(spool):
            started = time.monotonic()
            error = self._try_push(messages)
            # A pooled connection may have died with an earlier Redis (or master): one fresh try if time allows.
            # Not after NotReplicated: the master has the messages (they are spooled as well).
            if (error and not isinstance(error, NotReplicated)
                    and time.monotonic() - started < self.settings.publish_timeout * ATTEMPT_SHARE):
                self._raise_if_misconfigured(payload, error, None)
                error = self._try_push(messages)
            if error is None:
                self._master_checked = True
                return QUEUED
            self._raise_if_misconfigured(payload, error, started)
        return self.fail_over(payload, messages, error, spool)

    def prepare(self, payload: dict[str, Any], vendors: list[str], task_id_suffix: str = "",
                event_json: str | None = None) -> list[Message]:
        """The messages (and, with ORDERING on, the writes that keep each call in its person's order)."""
        if self.settings.ordering:
            return ordered(self.messages, payload, vendors, self.settings.key_prefix, task_id_suffix, event_json)
        return self.messages.build(payload, vendors, task_id_suffix, event_json)

    @property
    def attempt_timeout(self) -> float:
        """Seconds one connect or write to Redis may take (a share of PUBLISH_TIMEOUT)."""
        return self.settings.publish_timeout * ATTEMPT_SHARE

    def worth_trying(self, spool: bool) -> bool:
        """Should a call try Redis? Not while it is known to be down (its messages go straight to the spool)."""
        return not self._down or not spool

    def fail_over(self, payload: dict[str, Any], messages: list[Message], error: Exception | None,
                  spool: bool = True) -> str:
        """Redis did not take ``messages`` (``error``; None: it is known to be down): spool them and return
        SPOOLED, or raise EnqueueError. It writes a file: an asyncio caller runs it in a thread."""
        if error is not None:
            self._mark_down(error)
        if not spool:
            raise EnqueueError(f"could not enqueue {payload['operation']} event {payload['id']}: "
                               f"{self.cause(error)}")
        return self._spool(payload, messages, error)

    def cause(self, error: BaseException | None = None) -> str:
        """Why Redis did not take an event, for a log line or an EnqueueError: ``error``, else the last error
        seen (a call made while Redis is known to be down has none of its own)."""
        error = error or self.last_error
        if is_full(error):
            return f"{REDIS_FULL} ({error})"
        return f"broker unreachable ({error})" if error else "broker unreachable"

    def _push(self, messages: list[Message]) -> None:
        _push(self.redis, messages, self._replicas, self._wait_ms)

    def _try_push(self, messages: list[Message]) -> Exception | None:
        try:
            self._push(messages)
        except (redis.RedisError, OSError) as exc:  # refused, reset, timed out, loading, out of memory...
            return exc
        return None

    def _raise_if_misconfigured(self, payload: dict[str, Any], error: Exception, started: float | None) -> None:
        """EnqueueError when ``error`` is one only a configuration change fixes (TLS certificate not accepted,
        password refused, a master name the Sentinels do not monitor): spooling would only hide it.

        With ``started`` (the call's last chance), when finding the master failed and no write has succeeded
        yet in this process, the Sentinels are asked whether they monitor REDIS_SENTINEL_MASTER at all, in
        what is left of the call's two attempts' share of PUBLISH_TIMEOUT (later calls go to the spool).
        """
        problem = config_problem(error)
        if (problem is None and started is not None and isinstance(error, MasterNotFoundError)
                and not self._master_checked):
            left = self.settings.publish_timeout * ATTEMPT_SHARE * 2 - (time.monotonic() - started)
            if left > 0:
                problem = self.target.explain(error, timeout=left / max(1, len(self.target.sentinels)))
        if problem:
            raise EnqueueError(f"could not enqueue {payload['operation']} event {payload['id']}: "
                               f"Redis ({self.target.describe()}) is misconfigured: {problem}") from None

    def _spool(self, payload: dict[str, Any], messages: list[Message], error: Exception | None) -> str:
        what = f"{payload['operation']} event {payload['id']}"
        cause = self.cause(error)
        if self.spool is None:
            raise EnqueueError(f"could not enqueue {what}: {cause}, and the local spool is off (SPOOL_ENABLED=false)")
        try:
            self.spool.put(payload["id"], messages)
        except SpoolFull as full:
            raise EnqueueError(f"could not enqueue {what}: {cause}, and {full}") from None
        except OSError as exc:
            raise EnqueueError(f"could not enqueue {what}: {cause}, and the spool cannot be written "
                               f"(SPOOL_DIR={self.settings.spool_dir}: {exc})") from None
        self._start_flusher()
        return SPOOLED

    def _mark_down(self, exc: Exception) -> None:
        with self._lock:
            self._note_down(exc)
            self._down = True
        self._start_flusher()

    def _note_down(self, exc: Exception) -> None:
        """Remember why Redis did not take a write; log it when Redis was up, or the reason changed kind
        (unreachable, full, replicas). The caller holds the lock."""
        kind = _kind(exc)
        if not self._down or kind != _kind(self.last_error):
            until = "it has room" if is_full(exc) else "it is back"
            log.warning("%s, spooling events to %s until %s: %s", kind,
                        self.settings.spool_dir if self.spool else "(spool off)", until, exc)
        self.last_error = exc

    # -- the flusher ------------------------------------------------------------

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher is not None and self._flusher.is_alive():
                return
            self._stop.clear()
            self._flusher = threading.Thread(target=self._flush_loop, name="vdw-spool-flusher", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            if self.flush_once():
                return

    def flush_once(self) -> bool:
        """One round: publish what the spool holds. True when Redis is up and the spool is empty."""
        if self.spool is not None:
            try:
                self.spool.refresh()  # here, not on a caller's thread: what other processes spooled meanwhile
            except OSError as exc:
                log.warning("the spool %s cannot be read: %s", self.spool.directory, exc)
        try:
            self.redis.ping()
            if self._replicas and self.redis.wait(self._replicas, self._wait_ms) < self._replicas:
                return False  # publishing now would only publish the same entries again next round
            if self.spool is not None:
                while self.spool.drain(self._push, limit=FLUSH_BATCH):
                    pass
        except (redis.RedisError, OSError) as exc:  # unreachable, or full (OOM): the next round tries again
            with self._lock:
                if self._down:
                    self._note_down(exc)
                else:
                    self.last_error = exc
            return False
        with self._lock:
            if self._down:
                log.warning("%s; spool drained", "Redis has room again" if is_full(self.last_error)
                            else "broker reachable again")
            self._down = False
            self.last_error = None
            # Entries spooled by a call racing with this round are taken by the next flusher.
            if self.spool is not None and self.spool.pending():
                return False
            self._flusher = None
            return True

    def close(self) -> None:
        self._stop.set()
        self.redis.close()


def _kind(exc: BaseException | None) -> str:
    """What a failed write says about Redis, as the log names it."""
    if is_full(exc):
        return REDIS_FULL
    return "replicas not confirming" if isinstance(exc, NotReplicated) else "broker unreachable"


def publish(payload: dict[str, Any], vendors: list[str], task_id_suffix: str = "", spool: bool = True,
            event_json: str | None = None) -> str:
    """Queue (or spool) one ``worker.deliver`` message per vendor; see :class:`Publisher`."""
    if not vendors:
        return QUEUED
    return Publisher.default().publish(payload, vendors, task_id_suffix, spool, event_json)
