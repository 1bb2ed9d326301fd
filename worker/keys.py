"""Where a call's place in its person's order lives in Redis: the names producers and workers share.

A producer writes each call's place (:func:`order_commands`) in the same MULTI as its message; the workers
(:mod:`worker.delivery.ordering`) read and end it; kombu's record of held messages is named here too, for the
scripts that acknowledge. This module imports no other of the package.

Example::

    >>> person_id("email:jill@acme.co")
    '97c7ecbe6d21ea08207e320a'
    >>> order_commands("vdw", "loops", "97c7ecbe6d21ea08207e320a", "e1.loops", "{}")[0]
    ('RPUSH', 'vdw:order:loops:97c7ecbe6d21ea08207e320a', 'e1.loops')
"""

from __future__ import annotations

import hashlib

#: kombu's Redis transport records every message a worker holds in this hash (tag -> [message, exchange,
#: queue]) and its index (tag -> time): ``Channel.unacked_key`` and ``unacked_index_key``, pinned by a unit test.
#: The retry schedule and a person's turn acknowledge a message in the same script by removing it from both.
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"

#: The message header naming the (vendor's) person a delivery is ordered under.
HEADER = "vdw_order"


def person_id(key: str) -> str:
    """The short, fixed-size name a person's keys carry (no identity in key names).

    >>> person_id("email:jill@acme.co")
    '97c7ecbe6d21ea08207e320a'
    """
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def order_keys(prefix: str, vendor: str) -> tuple[str, str]:
    """The vendor's events hash and the prefix of its per-person keys."""
    base = f"{prefix}:order:{vendor}"
    return f"{base}:events", base


def order_commands(prefix: str, vendor: str, person: str, task_id: str, event_json: str) -> list[tuple[str, ...]]:
    """The producer's writes that put one call in its person's order (sent in the MULTI that queues it)."""
    events, base = order_keys(prefix, vendor)
    return [("RPUSH", f"{base}:{person}", task_id), ("HSET", events, task_id, event_json)]
