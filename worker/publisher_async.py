"""The asyncio side of :mod:`worker.publisher`: the same messages, bounds and spool, never blocking the loop.

:class:`AsyncPublisher` writes the messages :class:`~worker.publisher.TaskMessages`
builds in one pipelined write through ``redis.asyncio``, each attempt bounded by
the same share of ``PUBLISH_TIMEOUT`` as the blocking publisher's (and by
``asyncio.timeout`` around the whole attempt: connect, write, read). Everything
else is the process's blocking :class:`~worker.publisher.Publisher`: its
"Redis is down" state, its spool and its flusher thread. What blocks — creating
that publisher (it imports Celery's app), writing a spool file (``fsync``) —
runs in a small thread pool of its own, so the event loop only ever awaits.

One AsyncPublisher per event loop (a ``redis.asyncio`` connection belongs to
the loop that made it); it follows ``Publisher.reset_default()`` and forks.

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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .publisher import QUEUED, Publisher, _lpush
from .spool import Message

#: Threads that write spool files (and create the process's publisher) for asyncio callers.
SPOOL_THREADS = 4

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


async def _push(client: redis.asyncio.Redis, messages: list[Message]) -> None:
    """LPUSH every message in one pipelined write on one connection (no MULTI, no retries)."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command([b"".join(_lpush(q, m) for q, m in messages)], check_health=False)
        for _ in messages:
            await conn.read_response()
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
        attempt = sync.attempt_timeout
        self.redis = redis.asyncio.Redis.from_url(
            sync.settings.redis_url,
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
            if old is not None:
                await old.aclose()
        return pub

    def is_current(self) -> bool:
        return Publisher._default is self.sync and Publisher._default_pid == os.getpid()

    async def publish(self, payload: dict[str, Any], vendors: list[str], task_id_suffix: str = "",
                      spool: bool = True, event_json: str | None = None) -> str:
        """Queue one message per vendor, or spool them (unless ``spool=False``); returns QUEUED or SPOOLED."""
        sync = self.sync
        messages = sync.messages.build(payload, vendors, task_id_suffix, event_json)
        error = None
        if sync.worth_trying(spool):
            started = time.monotonic()
            error = await self._try_push(messages)
            # A pooled connection may have died with an earlier Redis: one fresh try if time allows.
            if error and time.monotonic() - started < sync.attempt_timeout:
                error = await self._try_push(messages)
            if error is None:
                return QUEUED
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor(), sync.fail_over, payload, messages, error, spool)

    async def _try_push(self, messages: list[Message]) -> Exception | None:
        try:
            async with asyncio.timeout(self.sync.attempt_timeout):
                await _push(self.redis, messages)
        except (redis.RedisError, OSError) as exc:  # refused, reset, timed out (TimeoutError is an OSError)...
            return exc
        return None

    async def aclose(self) -> None:
        try:
            await self.redis.aclose()
        except (redis.RedisError, OSError):
            pass
