"""A Lua script call, made now or later, alone or with others in one round trip.

A delivery's end is recorded with its message's acknowledgement in one script (:meth:`PersonLog.finish_call
<worker.delivery.ordering.PersonLog.finish_call>`); the consumer makes that call when Celery acknowledges
the message. On the threads pool every acknowledgement runs on the consumer's one thread, which also takes
the messages: :func:`run_together` lets it make the acknowledgements of one turn of its loop in one round trip.

Example::

    >>> client = redis.Redis()                                               # doctest: +SKIP
    >>> one = ScriptCall(client.register_script("return ARGV[1]"), [], ["a"])  # doctest: +SKIP
    >>> one()                                                                # doctest: +SKIP
    b'a'
    >>> run_together([one, one._replace(args=["b"])])                        # doctest: +SKIP
    [b'a', b'b']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import redis
from redis.commands.core import Script


class ScriptCall(NamedTuple):
    """``script`` with these keys and arguments, on the client it was registered with."""

    script: Script
    keys: list[Any]
    args: list[Any]

    def __call__(self) -> Any:
        """Made alone (redis-py loads the script first if Redis does not have it)."""
        return self.script(keys=self.keys, args=self.args)


def run_together(calls: Sequence[ScriptCall]) -> list[Any]:
    """Each call's reply, or the :class:`redis.RedisError` it ended with, in order: the calls on one client go in
    one pipeline (one round trip, not a transaction: each call is atomic on its own, as alone). A call whose
    script Redis does not have (restarted, ``SCRIPT FLUSH``) is made again alone, which loads it. When the
    round trip itself fails (Redis away), every call of it ends with that error: whether Redis ran them is
    unknown, as for one call alone."""
    out: list[Any] = [None] * len(calls)
    clients: dict[int, list[int]] = {}
    for i, call in enumerate(calls):
        clients.setdefault(id(call.script.registered_client), []).append(i)
    for numbers in clients.values():
        client = calls[numbers[0]].script.registered_client
        try:
            with client.pipeline(transaction=False) as pipe:
                for i in numbers:
                    call = calls[i]
                    pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
                replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            for i in numbers:
                out[i] = exc
            continue
        for i, reply in zip(numbers, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                try:
                    reply = calls[i]()
                except redis.RedisError as exc:
                    reply = exc
            out[i] = reply
    return out
