"""The dead-letter store: deliveries that failed for good, kept until replayed or purged.

Entries live in Redis with no expiry: a hash ``<prefix>:deadletters`` (id ->
JSON) and a sorted set ``<prefix>:deadletters:index`` (id by failure time).
Credentials never reach an entry: requests are stored without their auth
headers, and every stored text is scrubbed of the configured secrets.

Example::

    >>> store = DeadLetterStore(redis.Redis(), "vdw")          # doctest: +SKIP
    >>> [(d.vendor, d.reason, d.status) for d in store.list()]  # doctest: +SKIP
    [('loops', 'rejected', 422)]
    >>> vendor_message('{"success": false, "message": "seats is not a number"}')
    'seats is not a number'
"""

from __future__ import annotations

import builtins
import json
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from pydantic import BaseModel, Field

from .events import utc_now
from .scrub import scrub

#: A vendor's response body is kept up to this many characters.
MAX_BODY_CHARS = 2048
#: A malformed message's raw text is kept up to this many characters.
MAX_RAW_CHARS = 4096

# Reasons an entry was dead-lettered.
REJECTED = "rejected"  # the vendor answered a permanent 4xx
RETRIES_EXHAUSTED = "retries_exhausted"  # transient failures for RETRY_WINDOW (or RETRY_MAX_ATTEMPTS attempts)
PROPERTY_CAP = "property_cap"  # more than EVENT_PROPERTY_CAP properties; never sent
MALFORMED = "malformed"  # the queue message was not a valid delivery
VENDOR_DISABLED = "vendor_disabled"  # the vendor's credentials are not set on this worker
REQUEST_ERROR = "request_error"  # the request could not be made (e.g. a bad base URL)
CONFIGURATION = "configuration"  # this worker's settings cannot carry it (e.g. no LOOPS_MAILING_LISTS entry)
#: Every reason, in the order operators read them (metrics label values).
REASONS = (REJECTED, RETRIES_EXHAUSTED, PROPERTY_CAP, MALFORMED, VENDOR_DISABLED, REQUEST_ERROR, CONFIGURATION)


class DeadLetter(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    vendor: str
    operation: str | None
    reason: str
    status: int | None = None
    attempts: int
    event_id: str | None
    #: When the last attempt failed; and, for a delivery that was retried, when the first one did.
    failed_at: str = Field(default_factory=utc_now)
    first_failed_at: str | None = None
    error: str = ""
    response_body: str | None = None
    request: dict[str, Any] | None = None
    #: The event as it was queued, replayed as is; None for a malformed message.
    event: dict[str, Any] | None = None
    task_id: str | None = None
    #: The raw message, for malformed ones.
    raw: str | None = None

    @property
    def replayable(self) -> bool:
        return self.event is not None and self.reason != MALFORMED


#: Keys of a JSON error body that hold the vendor's message, in the order they are looked for.
MESSAGE_KEYS = ("message", "error", "detail", "errors", "msg")
#: The end of the index key of a dead-letter store, after its KEY_PREFIX.
INDEX_SUFFIX = ":deadletters:index"


#: The ERROR column's width (``deadletters list``), and how much of it Flower's FAILURE shows.
ERROR_WIDTH = 100


def error_text(entry: DeadLetter, secrets: Sequence[str] = (), width: int = ERROR_WIDTH) -> str:
    """The ERROR column: the entry's error and, unless it already says it, the vendor's message from the
    response body; on one line, scrubbed of ``secrets``, cut to ``width`` characters (ending in "…")."""
    text = entry.error
    message = vendor_message(entry.response_body)
    if message and message not in text:
        text = f"{text}: {message}" if text else message
    text = one_line(scrub(text, list(secrets)))
    return text if len(text) <= width else text[: width - 1] + "…"


def one_line(text: str) -> str:
    """``text`` on one line: control characters (a vendor's ANSI escapes too) and runs of space become one space."""
    return re.sub(r"[\x00-\x20\x7f-\x9f]+", " ", text).strip()


def vendor_message(body: str | None) -> str | None:
    """The vendor's own words in a response body, on one line: a JSON body's ``message`` / ``error`` /
    ``detail`` / ``errors[].message``, else the body's text; None for an empty body."""
    if not body or not body.strip():
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return one_line(body) or None
    found = _message_in(data)
    if found is None:
        found = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return one_line(found) or None


def _message_in(data: Any) -> str | None:
    if isinstance(data, str):
        return data or None
    if isinstance(data, list):
        parts = [m for m in (_message_in(item) for item in data) if m]
        return "; ".join(parts) or None
    if isinstance(data, dict):
        for key in MESSAGE_KEYS:
            if key in data:
                found = _message_in(data[key])
                if found:
                    return found
    return None


class DeadLetterStore:
    def __init__(self, client: redis.Redis, prefix: str, secrets: Iterable[str] = ()) -> None:
        self.client = client
        self.hash_key = f"{prefix}:deadletters"
        self.index_key = f"{prefix}:deadletters:index"
        self.secrets = [s for s in secrets if s]

    @classmethod
    def default(cls) -> DeadLetterStore:
        """The store the settings name: the process's Redis client, KEY_PREFIX, the credentials to scrub."""
        from . import clients
        from .settings import get_settings

        s = get_settings()
        return cls(clients.redis_client(), s.key_prefix, s.secrets())

    def add(self, entry: DeadLetter) -> DeadLetter:
        if entry.response_body is not None:
            entry.response_body = entry.response_body[:MAX_BODY_CHARS]
        if entry.raw is not None:
            entry.raw = entry.raw[:MAX_RAW_CHARS]
        data = scrub(entry.model_dump_json(), self.secrets)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.hash_key, entry.id, data)
        pipe.zadd(self.index_key, {entry.id: time.time()})
        pipe.execute()
        return DeadLetter.model_validate_json(data)

    def get(self, entry_id: str) -> DeadLetter | None:
        data = self.client.hget(self.hash_key, entry_id)
        return DeadLetter.model_validate_json(data) if data else None

    def list(self, vendor: str | None = None) -> list[DeadLetter]:
        """Oldest first."""
        ids = self.client.zrange(self.index_key, 0, -1)
        if not ids:
            return []
        rows = self.client.hmget(self.hash_key, ids)  # type: ignore[arg-type]  # zrange without scores: names
        entries = [DeadLetter.model_validate_json(r) for r in rows if r]
        return [e for e in entries if vendor is None or e.vendor == vendor]

    def remove(self, entry_id: str) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self.hash_key, entry_id)
        pipe.zrem(self.index_key, entry_id)
        return bool(pipe.execute()[0])

    def purge(self, vendor: str | None = None) -> int:
        return sum(self.remove(e.id) for e in self.list(vendor))

    def count(self) -> int:
        return self.client.hlen(self.hash_key)

    def find(self, key: str) -> builtins.list[DeadLetter]:  # `list` is the method above
        """The dead letters ``key`` names: a dead-letter id; else an event id, or a task id
        (``<event id>.<vendor>``, as Flower shows it): all of that event's (or task's) dead letters, oldest first."""
        entry = self.get(key)
        if entry is not None:
            return [entry]
        return [e for e in self.list() if key in (e.event_id, e.task_id)]


def other_prefixes(client: redis.Redis, prefix: str) -> dict[str, int]:
    """KEY_PREFIXes other than ``prefix`` under which this Redis keeps dead letters, with how many.

    For the CLI's hint when it finds none under its own prefix (e.g. the demo uses ``vdw-demo``).
    """
    found: dict[str, int] = {}
    for key in client.scan_iter(match="*" + INDEX_SUFFIX, count=1000):
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        other = name[: -len(INDEX_SUFFIX)]
        if other != prefix:
            count = client.zcard(key)
            if count:
                found[other] = count
    return dict(sorted(found.items()))
