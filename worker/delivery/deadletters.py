"""The dead-letter store: deliveries that failed for good, kept until replayed or purged.

Entries live in Redis with no expiry: a hash ``<prefix>:deadletters`` (id ->
JSON) and a sorted set ``<prefix>:deadletters:index`` (id by failure time).
Credentials never reach an entry: requests are stored without their auth
headers, and every stored text is scrubbed of the configured secrets.

How many there are by vendor and reason is kept in a third hash,
``<prefix>:deadletters:counts``, updated in the same Lua script as every add
and remove (purge removes one by one), so :meth:`DeadLetterStore.counts` --
``python -m worker status`` and each metrics scrape -- costs one round trip
whatever the number of dead letters. A store written before the counts existed
(or by an older worker meanwhile) is recounted once, in one atomic script, the
first time its counts are read and found missing or not adding up to the
number of entries; ``python -m worker deadletters recount`` does it on demand.

Example::

    >>> store = DeadLetterStore(redis.Redis(), "vdw")          # doctest: +SKIP
    >>> [(d.vendor, d.reason, d.status) for d in store.list()]  # doctest: +SKIP
    [('loops', 'rejected', 422)]
    >>> store.counts()                                          # doctest: +SKIP
    {'loops': {'rejected': 1}}
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

from ..errors import (
    MALFORMED,
)
from ..events import utc_now
from ..scrub import scrub

#: A vendor's response body is kept up to this many characters.
MAX_BODY_CHARS = 2048
#: A malformed message's raw text is kept up to this many characters.
MAX_RAW_CHARS = 4096



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

#: The field of the counts hash that says its counts are complete (every other field is a JSON [vendor, reason]).
COUNTS_READY = "ready"

# The counts hash's field of a stored entry: the JSON array [vendor, reason], as Redis' cjson writes it (the same
# text whoever computes it); an entry that is not a JSON object counts under ["?", "?"].
_LUA_HELPERS = """
local function field(data)
  local ok, e = pcall(cjson.decode, data)
  local v, r = '?', '?'
  if ok and type(e) == 'table' then
    if type(e['vendor']) == 'string' then v = e['vendor'] end
    if type(e['reason']) == 'string' then r = e['reason'] end
  end
  return cjson.encode({v, r})
end
local function uncount(key, f)
  if redis.call('HINCRBY', key, f, -1) <= 0 then redis.call('HDEL', key, f) end
end
"""

# KEYS: hash, index, counts. ARGV: id, entry JSON, score. Replaces an entry stored under the same id.
_ADD = _LUA_HELPERS + """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then uncount(KEYS[3], field(old)) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[3], field(ARGV[2]), 1)
return 1
"""

# KEYS: hash, index, counts. ARGV: id. Returns 1 if there was such an entry.
_REMOVE = _LUA_HELPERS + """
redis.call('ZREM', KEYS[2], ARGV[1])
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
uncount(KEYS[3], field(old))
return 1
"""

# KEYS: hash, counts. ARGV: 1 = recount whatever the state. Unless forced, does nothing (returns -1) when the counts
# are complete and add up to the number of entries; else counts every entry afresh (HSCAN, chunk by chunk, in this
# one atomic script: nothing changes the hash meanwhile) and returns how many it counted.
# KEYS: counts, entries. The counts and how many entries there are, in one atomic read (a script: Redis at
# maxmemory refuses a MULTI, reads included, but runs a script that only reads).
_COUNTS = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HLEN', KEYS[2])}
"""

_RECOUNT = _LUA_HELPERS + """
if ARGV[1] ~= '1' and redis.call('HEXISTS', KEYS[2], 'ready') == 1 then
  local total, c = 0, redis.call('HGETALL', KEYS[2])
  for i = 1, #c, 2 do
    if c[i] ~= 'ready' then total = total + tonumber(c[i + 1]) end
  end
  if total == redis.call('HLEN', KEYS[1]) then return -1 end
end
local counts, n, cursor = {}, 0, '0'
repeat
  local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 1000)
  cursor = page[1]
  local kv = page[2]
  for i = 2, #kv, 2 do
    local f = field(kv[i])
    counts[f] = (counts[f] or 0) + 1
    n = n + 1
  end
until cursor == '0'
redis.call('DEL', KEYS[2])
for f, c in pairs(counts) do redis.call('HSET', KEYS[2], f, c) end
redis.call('HSET', KEYS[2], 'ready', 1)
return n
"""


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
        self.counts_key = f"{prefix}:deadletters:counts"
        self.secrets = [s for s in secrets if s]
        self._add = client.register_script(_ADD)
        self._remove = client.register_script(_REMOVE)
        self._recount = client.register_script(_RECOUNT)
        self._counts = client.register_script(_COUNTS)

    @classmethod
    def default(cls) -> DeadLetterStore:
        """The store the settings name: the process's Redis client, KEY_PREFIX, the credentials to scrub."""
        from .. import clients
        from ..settings import get_settings

        s = get_settings()
        return cls(clients.redis_client(), s.key_prefix, s.secrets())

    def add(self, entry: DeadLetter) -> DeadLetter:
        if entry.response_body is not None:
            entry.response_body = entry.response_body[:MAX_BODY_CHARS]
        if entry.raw is not None:
            entry.raw = entry.raw[:MAX_RAW_CHARS]
        data = scrub(entry.model_dump_json(), self.secrets)
        self._add(keys=self._keys(), args=[entry.id, data, repr(time.time())])
        return DeadLetter.model_validate_json(data)

    def _keys(self) -> list[str]:
        return [self.hash_key, self.index_key, self.counts_key]

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
        return bool(int(self._remove(keys=self._keys(), args=[entry_id])))

    def purge(self, vendor: str | None = None) -> int:
        return sum(self.remove(e.id) for e in self.list(vendor))

    def count(self) -> int:
        return self.client.hlen(self.hash_key)

    def counts(self) -> dict[str, dict[str, int]]:
        """How many dead letters are stored, by vendor and reason (``{"loops": {"rejected": 2}}``; a vendor with
        none is absent). One round trip, whatever their number -- unless the counts need a recount (see
        :meth:`recount`), which this does first."""
        flat, stored = self._counts(keys=[self.counts_key, self.hash_key])
        found = _decode_counts(dict(zip(flat[::2], flat[1::2], strict=True)))
        if found is None or sum(n for per in found.values() for n in per.values()) != stored:
            self.recount(force=False)
            found = _decode_counts(self.client.hgetall(self.counts_key)) or {}
        return found

    def recount(self, force: bool = True) -> int | None:
        """Count every stored dead letter afresh, in one atomic script (its time grows with their number).
        Without ``force`` only when the counts are missing or do not add up to the number of entries (a store
        older than the counts, or one an older version wrote to meanwhile). Returns how many it counted, or None
        when it had nothing to do."""
        n = int(self._recount(keys=[self.hash_key, self.counts_key], args=["1" if force else "0"]))
        return None if n < 0 else n

    def find(self, key: str) -> builtins.list[DeadLetter]:  # `list` is the method above
        """The dead letters ``key`` names: a dead-letter id; else an event id, or a task id
        (``<event id>.<vendor>``, as Flower shows it): all of that event's (or task's) dead letters, oldest first."""
        entry = self.get(key)
        if entry is not None:
            return [entry]
        return [e for e in self.list() if key in (e.event_id, e.task_id)]


def _decode_counts(raw: dict) -> dict[str, dict[str, int]] | None:
    """The counts hash as ``{vendor: {reason: n}}``; None when it is not complete (no ``ready`` field)."""
    fields = {_str(k): int(v) for k, v in raw.items()}
    if COUNTS_READY not in fields:
        return None
    out: dict[str, dict[str, int]] = {}
    for key, n in fields.items():
        if key == COUNTS_READY or n <= 0:
            continue
        vendor, reason = json.loads(key)
        out.setdefault(vendor, {})[reason] = n
    return out


def _str(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


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
