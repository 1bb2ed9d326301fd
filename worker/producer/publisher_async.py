"""The asyncio side of :mod:`worker.producer.publisher`: the same messages, bounds and spool, never blocking the loop.

:class:`AsyncPublisher` writes the messages :class:`~worker.producer.publisher.TaskMessages`
builds in one pipelined write through ``redis.asyncio``, each attempt bounded by
the same share of ``PUBLISH_TIMEOUT`` as the blocking publisher's (and by
``asyncio.timeout`` around the whole attempt: connect, write, read). Everything
else is the process's blocking :class:`~worker.producer.publisher.Publisher`: its
"Redis is down" state, its spool and its flusher thread. What blocks — creating
that publisher (it imports Celery's app), writing a spool file (``fsync``) —
runs in a thread of its own, so the event loop only ever awaits.

One AsyncPublisher per event loop (a ``redis.asyncio`` connection belongs to
the loop that made it); it follows ``Publisher.reset_default()`` and forks, and
closes its connections when its loop shuts down (``asyncio.run`` and asgiref's
``async_to_sync`` — a Django async view under WSGI — end each loop with
``shutdown_asyncgens()``, which runs an async generator's ``finally``), so
short-lived loops leave no socket behind.

Example::

    >>> publisher = await AsyncPublisher.current()                              # doctest: +SKIP
    >>> await publisher.publish({"id": "5f0c...", ...}, ["loops", "conveyour"])  # doctest: +SKIP
    'queued'
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..envelope import Message
from .publisher import QUEUED, NotReplicated, Publisher, _check_replicated, wire

#: Threads that write spool files (and create the process's publisher) for asyncio callers. One: every
#: thread more contends with the event loop for the GIL (with four, the loop stalled several times longer
#: while they spooled; docs: Performance); a spooled call waits for an fsync, not for Python.
SPOOL_THREADS = 1

_executor: ThreadPoolExecutor | None = None
_executor_pid: int | None = None
_executor_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    """The process's thread pool for the blocking parts (made anew in a forked child)."""
    global _executor, _executor_pid
    with _executor_lock:
        if _executor is None or _executor_pid != os.getpid():
            _executor = ThreadPoolExecutor(SPOOL_THREADS, thread_name_prefix="vdw-spool")
            _executor_pid = os.getpid()
        return _executor


async def _push(client: redis.asyncio.Redis, messages: list[Message], replicas: int = 0, wait_ms: int = 0) -> None:
    """LPUSH every message in one pipelined write on one connection (no MULTI, no retries); with ``replicas``,
    a ``WAIT replicas wait_ms`` in the same write, and NotReplicated if fewer confirm (as the blocking one)."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        data, replies = wire(messages, replicas, wait_ms)
        await conn.send_packed_command([data], check_health=False)
        for _ in range(replies):
            await conn.read_response()
        if replicas:
            _check_replicated(await conn.read_response(), replicas, wait_ms)
    except NotReplicated:
        raise
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)


class AsyncPublisher:
    """Publishes fan-out messages for one event loop of this process."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncPublisher] = weakref.WeakKeyDictionary()

    def __init__(self, sync: Publisher) -> None:
        self.sync = sync
        self._closer: AsyncGenerator[None, None] | None = None
        attempt = sync.attempt_timeout
        # Plain, TLS or Sentinel: the same target as the blocking publisher's (worker.redisconf).
        self.redis = sync.target.async_client(
            socket_connect_timeout=attempt,
            socket_timeout=attempt,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )

    @classmethod
    async def current(cls) -> AsyncPublisher:
        """The running loop's publisher, on top of the process's :meth:`Publisher.default`."""
        loop = asyncio.get_running_loop()
        pub = cls._by_loop.get(loop)
        if pub is not None and pub.is_current():
            return pub
        sync = await loop.run_in_executor(executor(), Publisher.default)
        pub = cls._by_loop.get(loop)  # another task may have made it meanwhile
        if pub is None or pub.sync is not sync:
            old, pub = pub, cls(sync)
            cls._by_loop[loop] = pub
            pub._closer = _close_with_loop(pub)
            await pub._closer.__anext__()
            if old is not None:
                await old.aclose()
        return pub

    def is_current(self) -> bool:
        return Publisher._default is self.sync and Publisher._default_pid == os.getpid()

    async def publish(self, payload: dict[str, Any], vendors: list[str], task_id_suffix: str = "",
                      spool: bool = True, event_json: str | None = None) -> str:
        """Queue one message per vendor, or spool them (unless ``spool=False``); returns QUEUED or SPOOLED."""
        sync = self.sync
        messages = sync.prepare(payload, vendors, task_id_suffix, event_json)
        error = None
        if sync.worth_trying(spool):
            started = time.monotonic()
            error = await self._try_push(messages)
            # A pooled connection may have died with an earlier Redis (or master): one fresh try if time allows.
            # Not after NotReplicated: the master has the messages (they are spooled as well).
            if (error and not isinstance(error, NotReplicated)
                    and time.monotonic() - started < sync.attempt_timeout):
                sync._raise_if_misconfigured(payload, error, None)  # no I/O without ``started``
                error = await self._try_push(messages)
            if error is None:
                sync._master_checked = True
                return QUEUED
            loop = asyncio.get_running_loop()
            # The last chance may ask the Sentinels whether they know the master (blocking): in the thread too.
            return await loop.run_in_executor(executor(), self._fail_over, payload, messages, error, spool, started)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor(), sync.fail_over, payload, messages, error, spool)

    def _fail_over(self, payload: dict[str, Any], messages: list[Message], error: Exception, spool: bool,
                   started: float) -> str:
        """In the spool's thread: EnqueueError for a misconfiguration, else spool as the blocking publisher does."""
        self.sync._raise_if_misconfigured(payload, error, started)
        return self.sync.fail_over(payload, messages, error, spool)

    async def _try_push(self, messages: list[Message]) -> Exception | None:
        sync = self.sync
        try:
            async with asyncio.timeout(sync.attempt_timeout):
                await _push(self.redis, messages, sync._replicas, sync._wait_ms)
        except (redis.RedisError, OSError) as exc:  # refused, reset, timed out (TimeoutError is an OSError)...
            return exc
        return None

    async def aclose(self) -> None:
        try:
            await self.redis.aclose()
        except (redis.RedisError, OSError):
            pass


async def _close_with_loop(pub: AsyncPublisher) -> AsyncGenerator[None, None]:
    """Suspended for the loop's life; the loop's ``shutdown_asyncgens()`` closes it, and ``pub`` with it."""
    try:
        yield
    finally:
        await pub.aclose()
