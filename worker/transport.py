"""kombu's Redis transport, hardened: a malformed message never kills a worker.

Stock kombu decodes each message popped from a Redis list inline; a list entry
that is not JSON, or JSON that is not a kombu envelope, raises out of the
consumer and stops the worker ("Unrecoverable error"). This transport catches
exactly those cases, stores the raw entry as a ``malformed`` dead letter (the
vendor is the queue's name) and goes on. ``celeryconfig.broker_transport``
selects it; ``REDIS_URL`` keeps its ordinary ``redis://`` form.

Example::

    >>> from kombu import Connection
    >>> Connection("redis://127.0.0.1:6379/0", transport="worker.transport:Transport").transport_cls
    'worker.transport:Transport'
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

#: Errors that mean Redis went away while a popped message was being recorded as unacknowledged.
LOST_REDIS = (redis.ConnectionError, redis.TimeoutError, OSError)

# Messages popped from a queue whose unacked record could not be written because Redis went away at
# that moment: they exist only here, so they go back on their queue once Redis answers again.
_orphans: list[tuple[str, Any]] = []
_orphans_lock = threading.Lock()

#: Keys every kombu message envelope has.
ENVELOPE_KEYS = ("body", "properties", "headers")


def quarantine(queue: str, raw: str, error: str) -> None:
    """Keep a message the worker cannot even decode, as a dead letter an operator can see and purge."""
    from .deadletters import MALFORMED, DeadLetter, DeadLetterStore

    log.error("malformed message on queue %s dead-lettered: %s", queue, error)
    try:
        DeadLetterStore.default().add(
            DeadLetter(vendor=queue, operation=None, reason=MALFORMED, attempts=0, event_id=None,
                       error=f"not a message: {error}", raw=raw)
        )
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


class Channel(kombu_redis.Channel):
    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        # Where this channel's Redis is, kept for _connparams below.
        self._conninfo = connection.client
        super().__init__(connection, *args, **kwargs)

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
        super()._brpop_start(timeout)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return super()._brpop_read(**options)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            items = getattr(self._queue_cycle, "items", None) or ["?"]
            raw = exc.doc if isinstance(exc, json.JSONDecodeError) else repr(exc.object[:4096])
            quarantine(str(items[-1]), raw, f"{type(exc).__name__}: {exc}")
            raise kombu_redis.Empty() from None


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


def _requeue_orphans(client: Any) -> None:
    with _orphans_lock:
        while _orphans:
            queue, message = _orphans[0]
            client.rpush(queue, dumps(message))  # the consuming end: it is taken next
            _orphans.pop(0)
            log.warning("put back on %s a message taken just before Redis went away", queue)
