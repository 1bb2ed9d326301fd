"""Sandbox state: recorded requests and per-vendor switches, behind one lock.

Switches (per vendor, see `VendorConfig`): ``latency_ms`` and
``latency_jitter_ms`` (uniform in latency ± jitter), ``rate_limit`` with
``rate_limit_mode`` and ``rate_limit_shared``, ``retry_after``/``retry_after_format``,
``fail_next`` (FIFO of injected failures; an entry with ``match`` waits for a
request whose body or Idempotency-Key contains that text), ``fail_all`` (outage) and
``revoke_key`` (true: the vendor's key stopped working -- every request to it fails the
credential check, its record shows ``auth_ok: false``, whatever credentials it carries).

Rate-limit modes (``rate_limit`` = N requests per second, counted when a request
arrives; refused requests do not count):

- ``sliding`` (default, the strictest): at most N arrivals in ANY 1-second window
  (for a fractional N: ``max(1, floor(N))`` arrivals in any ``that / N`` seconds);
- ``fixed``: at most N arrivals per wall-clock second (the same window, aligned);
- ``bucket``: a token bucket of N tokens refilled at N/s (lenient: N back to back).

``rate_limit_shared`` = S req/s: a simulated second application holding the same
API key sends S requests a second, evenly spaced, into the same limit.

Person state (``/_sandbox/state``, `person_states`): each vendor's `VendorAPI.person_writes`
says what a request it accepted (its route answered 2xx) changed for whom; refused
requests (injected failures, 401, 429, 409, 4xx) change nothing.  Writes are folded in
``seq`` (arrival) order: one answered late because of its latency keeps its place (it
waits in `PersonStore` until every earlier arrival is answered; a read applies waiting
writes to copies).  At most `MAX_PERSONS` persons per vendor (a new one drops the least
recently written) and `MAX_PERSON_EVENTS` events per person (the oldest go; ``writes``
counts on).  A request that arrived before a `reset` changes nothing after it.

Example::

    state = SandboxState(["loops"])
    state.configure("loops", {"fail_next": [503], "rate_limit": 10, "rate_limit_mode": "sliding"})
    record = state.begin("loops", "POST", "/events/send", "", {}, b"{}", True, None)
    state.take_failure("loops")      # -> Failure(status=503, ...)
    state.configure("loops", {"fail_next": [{"status": 503, "match": '"upgraded"'}]})
    state.take_failure("loops", '{"eventName": "signup"}')    # -> None: the entry waits
    state.take_failure("loops", '{"eventName": "upgraded"}')  # -> Failure(status=503, ...)
    state.rate_limit_headers("loops")  # -> [("x-ratelimit-limit", "10"), ("x-ratelimit-remaining", "9")]
    state.finish(record, 503)
    state.requests(status=503)       # -> [{"seq": 1, "vendor": "loops", ...}]
    first, second = (state.begin("loops", "PUT", "/contacts/update", "", {}, b"{}", True, None) for _ in range(2))
    state.finish(second, 200, [("ada", [("set", "plan", "pro")])])    # answered first, arrived second
    state.finish(first, 200, [("ada", [("set", "plan", "free")])])
    state.person_states("loops", "ada")  # -> {"loops": {"ada": {"fields": {"plan": "pro"}, ..., "writes": 2}}}
    state.configure("loops", {"revoke_key": True})   # every later request: auth_ok False, 401
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

from .base import Op, PersonWrite, VendorAPI

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "MAX_PERSONS",
    "MAX_PERSON_EVENTS",
    "MAX_RECORDS",
    "REDACTED_HEADERS",
    "RATE_LIMIT_MODES",
    "Failure",
    "FixedWindow",
    "Limit",
    "PersonState",
    "PersonStore",
    "SandboxState",
    "SlidingWindow",
    "TokenBucket",
    "VendorConfig",
    "format_retry_after",
]

# Oldest recorded requests are dropped beyond this many.
MAX_RECORDS = 200_000
# Persons kept per vendor in /_sandbox/state; beyond it the least recently written one is dropped.
MAX_PERSONS = 10_000
# Events kept per person in /_sandbox/state; beyond it the oldest are dropped (``writes`` still counts them).
MAX_PERSON_EVENTS = 1_000
# Retry-After (seconds) sent with 429s when the vendor config does not say.
DEFAULT_RETRY_AFTER = 1
# Header names whose values are replaced by REDACTED in records.
REDACTED_HEADERS = frozenset({"authorization", "x-conveyour-appkey", "x-conveyour-token"})
# Replacement for secret header values.
REDACTED = "<redacted>"
# Accepted values of the ``retry_after_format`` switch.
RETRY_AFTER_FORMATS = ("seconds", "http-date")
# Accepted values of the ``rate_limit_mode`` switch; the first is the default.
RATE_LIMIT_MODES = ("sliding", "fixed", "bucket")


def format_retry_after(value: int | float | str, fmt: str = "seconds") -> str:
    """Render a Retry-After header value.

    Strings are sent verbatim; numbers are seconds, rendered as an integer or,
    with ``fmt="http-date"``, as the HTTP date that many seconds from now.

    >>> format_retry_after(2)
    '2'
    """
    if isinstance(value, str):
        return value
    if fmt == "http-date":
        when = datetime.now(UTC) + timedelta(seconds=value)
        return format_datetime(when, usegmt=True)
    return str(math.ceil(value))


def window_of(rate: float) -> tuple[int, float]:
    """(capacity, seconds) of the counting window of a ``rate`` per second limit.

    >>> window_of(10), window_of(0.5)
    ((10, 1.0), (1, 2.0))
    """
    capacity = max(1, math.floor(rate + 1e-9))
    return capacity, capacity / rate


class Limit:
    """A vendor's counter. ``take(now)`` admits or refuses one arrival at ``now`` (seconds);
    ``remaining(now)`` is what is left in the window. Arrivals may come a little out of order
    (requests stamped when they reached the host, counted by the connection threads that read them).

    Not thread-safe by itself; `SandboxState` calls it under its lock.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity, self.window = window_of(rate)

    def take(self, now: float) -> bool:
        raise NotImplementedError

    def spend(self, now: float) -> None:
        """Count an arrival that is never refused (the simulated second app's)."""
        raise NotImplementedError

    def remaining(self, now: float) -> int:
        raise NotImplementedError


class SlidingWindow(Limit):
    """At most ``capacity`` admitted arrivals in any ``window`` seconds (two arrivals exactly
    ``window`` apart are in no window together), whatever order they are counted in.

    >>> w = SlidingWindow(2)
    >>> [w.take(t) for t in (0.0, 0.1, 0.9, 1.0, 1.05, 1.1)]
    [True, True, False, True, False, True]
    >>> w = SlidingWindow(2)
    >>> [w.take(t) for t in (0.5, 0.0, 0.1, 1.0)]   # 0.1 counted late: 0.0, 0.1, 0.5 share a second
    [True, True, False, True]
    """

    def __init__(self, rate: float) -> None:
        super().__init__(rate)
        self.log: list[float] = []  # admitted arrivals, sorted
        self.latest = -math.inf

    def _expire(self, now: float) -> None:
        # Keep what an arrival counted late could still share a window with.
        self.latest = max(self.latest, now)
        drop = bisect.bisect_right(self.log, self.latest - 2 * self.window)
        if drop:
            del self.log[:drop]

    def take(self, now: float) -> bool:
        self._expire(now)
        log, cap = self.log, self.capacity
        at = bisect.bisect_right(log, now)
        with_now = [*log[max(0, at - cap) : at], now, *log[at : at + cap]]
        # Every capacity + 1 consecutive arrivals, ``now`` among them, must span a whole window.
        for first, last in zip(with_now, with_now[cap:], strict=False):
            if first > last - self.window:
                return False
        log.insert(at, now)
        return True

    def spend(self, now: float) -> None:
        self._expire(now)
        bisect.insort(self.log, now)

    def remaining(self, now: float) -> int:
        self._expire(now)
        return self.capacity - (len(self.log) - bisect.bisect_right(self.log, now - self.window))


class FixedWindow(Limit):
    """At most ``capacity`` admitted arrivals per clock-aligned window (a wall-clock second for N >= 1).

    >>> w = FixedWindow(2)
    >>> [w.take(t) for t in (0.0, 0.1, 0.9, 1.0, 1.05, 1.1, 0.95)]
    [True, True, False, True, True, False, False]
    """

    def __init__(self, rate: float) -> None:
        super().__init__(rate)
        self.counts: dict[int, int] = {}

    def _index(self, now: float) -> int:
        index = math.floor(now / self.window)
        for old in [i for i in self.counts if i < index - 2]:
            del self.counts[old]
        return index

    def take(self, now: float) -> bool:
        index = self._index(now)
        if self.counts.get(index, 0) >= self.capacity:
            return False
        self.counts[index] = self.counts.get(index, 0) + 1
        return True

    def spend(self, now: float) -> None:
        index = self._index(now)
        self.counts[index] = self.counts.get(index, 0) + 1

    def remaining(self, now: float) -> int:
        return self.capacity - self.counts.get(self._index(now), 0)


class TokenBucket(Limit):
    """Token bucket: ``size = max(rate, 1)`` tokens, refilled at ``rate``/s (lenient).

    >>> b = TokenBucket(2)
    >>> [b.take(t) for t in (0.0, 0.0, 0.0, 0.5)]
    [True, True, False, True]
    """

    def __init__(self, rate: float) -> None:
        super().__init__(rate)
        # A whole number of tokens or not (the windows' ``capacity`` is a whole number of arrivals).
        self.size = max(rate, 1.0)
        self.tokens = self.size
        self.updated: float | None = None

    def _refill(self, now: float) -> None:
        # An arrival counted late refills nothing: the bucket's time only moves forward.
        if self.updated is None or now > self.updated:
            if self.updated is not None:
                self.tokens = min(self.size, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float | None = None) -> bool:
        """Consume one token if available."""
        self._refill(time.monotonic() if now is None else now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def spend(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0

    def remaining(self, now: float) -> int:
        self._refill(now)
        return math.floor(self.tokens)


_LIMITS: dict[str, type[Limit]] = {"sliding": SlidingWindow, "fixed": FixedWindow, "bucket": TokenBucket}


class SharedLimit:
    """A vendor's `Limit` plus the simulated second app spending ``shared`` req/s of it.

    The second app's requests arrive every ``1/shared`` s from the first use on; each
    is counted (never refused: it uses its share whatever ours do) just before a real
    arrival is.
    """

    def __init__(self, limit: Limit, shared: float, start: float) -> None:
        self.limit = limit
        self.interval = 1.0 / shared if shared > 0 else None
        self.next_other = start

    def _others(self, now: float) -> None:
        if self.interval is None:
            return
        while self.next_other <= now:
            self.limit.spend(self.next_other)
            self.next_other += self.interval

    def take(self, now: float) -> bool:
        self._others(now)
        return self.limit.take(now)

    def remaining(self, now: float) -> int:
        self._others(now)
        return self.limit.remaining(now)


@dataclass(frozen=True)
class Failure:
    """An injected failure to answer instead of the normal response."""

    status: int
    retry_after: str | None = None
    body: Any = None


def _check_status(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValueError(f"{name} must be an HTTP status code (100-599), got {value!r}")
    return value


def _check_number(value: object, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _check_retry_after(value: object, name: str) -> int | float | str:
    if isinstance(value, str):
        return value
    _check_number(value, name)
    return value  # type: ignore[return-value]


def _check_fail_entry(entry: object) -> int | dict[str, Any]:
    if isinstance(entry, dict):
        unknown = set(entry) - {"status", "retry_after", "body", "match"}
        if unknown:
            raise ValueError(f"unknown fail_next keys: {sorted(unknown)}")
        _check_status(entry.get("status"), "fail_next[].status")
        if "match" in entry and (not isinstance(entry["match"], str) or not entry["match"]):
            raise ValueError(f"fail_next[].match must be a non-empty string, got {entry['match']!r}")
        if entry.get("retry_after") is not None:
            _check_retry_after(entry["retry_after"], "fail_next[].retry_after")
        return dict(entry)
    return _check_status(entry, "fail_next entry")


@dataclass
class VendorConfig:
    """Switches of one vendor.  `update` validates and applies a partial dict."""

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rate_limit: float | None = None
    rate_limit_mode: str = RATE_LIMIT_MODES[0]
    rate_limit_shared: float = 0.0
    retry_after: int | float | str = DEFAULT_RETRY_AFTER
    retry_after_format: str = "seconds"
    fail_next: deque[int | dict[str, Any]] = field(default_factory=deque)
    fail_all: int | None = None
    fail_all_retry_after: int | float | str | None = None
    revoke_key: bool = False

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply ``changes`` (null resets a switch); raises ValueError, applying nothing."""
        new = VendorConfig(**{**self.__dict__, "fail_next": deque(self.fail_next)})
        defaults = VendorConfig()
        for key, value in changes.items():
            if key not in defaults.__dict__:
                raise ValueError(f"unknown switch {key!r}; known: {sorted(defaults.__dict__)}")
            if value is None:
                setattr(new, key, getattr(defaults, key))
            elif key in ("latency_ms", "latency_jitter_ms", "rate_limit_shared"):
                setattr(new, key, _check_number(value, key))
            elif key == "rate_limit":
                new.rate_limit = _check_number(value, key, positive=True)
            elif key == "rate_limit_mode":
                if value not in RATE_LIMIT_MODES:
                    raise ValueError(f"rate_limit_mode must be one of {RATE_LIMIT_MODES}, got {value!r}")
                new.rate_limit_mode = value
            elif key in ("retry_after", "fail_all_retry_after"):
                setattr(new, key, _check_retry_after(value, key))
            elif key == "retry_after_format":
                if value not in RETRY_AFTER_FORMATS:
                    raise ValueError(f"retry_after_format must be one of {RETRY_AFTER_FORMATS}")
                new.retry_after_format = value
            elif key == "fail_next":
                entries = value if isinstance(value, list) else [value]
                new.fail_next = deque(_check_fail_entry(entry) for entry in entries)
            elif key == "fail_all":
                new.fail_all = _check_status(value, key)
            elif key == "revoke_key":
                if not isinstance(value, bool):
                    raise ValueError(f"revoke_key must be true or false, got {value!r}")
                new.revoke_key = value
        self.__dict__.update(new.__dict__)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "fail_next": list(self.fail_next)}


class PersonState:
    """What a vendor's accepted writes made of one person: fields, memberships, events.

    >>> p = PersonState()
    >>> p.apply([("set", "plan", "pro"), ("inc", "logins", 2), ("member", "vip", True), ("event", {"e": 1}, None)])
    >>> p.render(("traits", "tags", "events"), members_as_map=False)
    {'traits': {'plan': 'pro', 'logins': 2}, 'tags': ['vip'], 'events': [{'e': 1}], 'writes': 1}
    """

    __slots__ = ("events", "fields", "members", "writes")

    def __init__(self, max_events: int = MAX_PERSON_EVENTS) -> None:
        self.fields: dict[str, Any] = {}
        self.members: dict[str, bool] = {}
        self.events: deque[Any] = deque(maxlen=max_events)
        self.writes = 0

    def copy(self) -> PersonState:
        other = PersonState.__new__(PersonState)
        other.fields, other.members, other.events = dict(self.fields), dict(self.members), self.events.copy()
        other.writes = self.writes
        return other

    def apply(self, ops: Iterable[Op]) -> None:
        """Apply one write's ops, in order (see `base.op_set` and the others)."""
        self.writes += 1
        for kind, key, value in ops:
            if kind == "set":
                self.fields[key] = value
            elif kind == "inc":
                current = self.fields.get(key)
                self.fields[key] = (current if _is_number(current) else 0) + value
            elif kind == "member":
                self.members[key] = value
            elif kind == "event":
                self.events.append(key)
            else:
                raise ValueError(f"unknown person op {kind!r}")

    def render(self, parts: Sequence[str], members_as_map: bool) -> dict[str, Any]:
        """``{fields: {...}, members: [sorted names in] or {name: bool}, events: [...], "writes": n}``,
        each part under the name ``parts`` gives it."""
        fields_name, members_name, events_name = parts
        members: Any = (
            dict(self.members) if members_as_map else sorted(name for name, isin in self.members.items() if isin)
        )
        return {fields_name: dict(self.fields), members_name: members, events_name: list(self.events),
                "writes": self.writes}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class PersonStore:
    """One vendor's persons, their accepted writes folded in arrival (``seq``) order.

    A write is folded once every request that arrived before it has been answered;
    until then it waits in ``pending`` (a request with latency is answered late but
    keeps its place), and a read applies the waiting writes to copies.  At most
    ``max_persons`` persons are kept: a new one drops the least recently written.
    Not thread-safe by itself; `SandboxState` calls it under its lock.

    >>> store = PersonStore()
    >>> first, second = object(), object()
    >>> store.arrive(1, first); store.arrive(2, second)
    >>> store.depart(2, second, [("ada", [("set", "plan", "pro")])])   # answered first, arrived second
    True
    >>> store.depart(1, first, [("ada", [("set", "plan", "free")])])
    True
    >>> store.persons["ada"].fields
    {'plan': 'pro'}
    """

    def __init__(self, max_persons: int = MAX_PERSONS, max_events: int = MAX_PERSON_EVENTS) -> None:
        self.max_persons = max_persons
        self.max_events = max_events
        self.persons: OrderedDict[str, PersonState] = OrderedDict()
        # Requests not answered yet: seq -> their record (to tell a request from before a reset).
        self._in_flight: dict[int, object] = {}
        # Heap of in-flight seqs; answered ones are dropped lazily from the top.
        self._in_flight_seqs: list[int] = []
        # Heap of (seq, writes) accepted but waiting for an earlier arrival to be answered.
        self._pending: list[tuple[int, list[PersonWrite]]] = []

    def arrive(self, seq: int, record: object) -> None:
        self._in_flight[seq] = record
        heapq.heappush(self._in_flight_seqs, seq)

    def depart(self, seq: int, record: object, writes: Sequence[PersonWrite]) -> bool:
        """The request ``seq`` was answered, having made ``writes``; False if it is not in flight here."""
        if self._in_flight.get(seq) is not record:
            return False
        del self._in_flight[seq]
        if writes:
            heapq.heappush(self._pending, (seq, list(writes)))
        oldest = self._oldest_in_flight()
        while self._pending and (oldest is None or self._pending[0][0] < oldest):
            _, folded = heapq.heappop(self._pending)
            for key, ops in folded:
                self._person(key).apply(ops)
        return True

    def _oldest_in_flight(self) -> int | None:
        heap = self._in_flight_seqs
        while heap and heap[0] not in self._in_flight:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _person(self, key: str) -> PersonState:
        person = self.persons.get(key)
        if person is None:
            person = self.persons[key] = PersonState(self.max_events)
            if len(self.persons) > self.max_persons:
                self.persons.popitem(last=False)
        else:
            self.persons.move_to_end(key)
        return person

    def view(self, person: str | None = None) -> dict[str, PersonState]:
        """Person key -> state (all, or only ``person``), waiting writes applied to copies."""
        if person is None:
            chosen = dict(self.persons)
        else:
            chosen = {person: self.persons[person]} if person in self.persons else {}
        patched: dict[str, PersonState] = {}
        for _, writes in sorted(self._pending, key=lambda entry: entry[0]):
            for key, ops in writes:
                if person is not None and key != person:
                    continue
                state = patched.get(key)
                if state is None:
                    base = chosen.get(key)
                    state = patched[key] = base.copy() if base is not None else PersonState(self.max_events)
                state.apply(ops)
        chosen.update(patched)
        return chosen


class SandboxState:
    """All mutable sandbox state, guarded by a single lock."""

    def __init__(
        self,
        vendors: Iterable[str],
        max_records: int = MAX_RECORDS,
        apis: Mapping[str, VendorAPI] | None = None,
        max_persons: int = MAX_PERSONS,
        max_person_events: int = MAX_PERSON_EVENTS,
    ) -> None:
        self.vendors = tuple(vendors)
        # Each vendor's API names its person state's parts (a vendor without one: the defaults).
        self._apis: dict[str, VendorAPI] = dict(apis or {})
        self._max_persons = max_persons
        self._max_person_events = max_person_events
        self._people: dict[str, PersonStore] = {}
        self._lock = threading.Lock()
        self._records: deque[dict[str, Any]] = deque(maxlen=max_records)
        self._seq = 0
        self._configs: dict[str, VendorConfig] = {}
        self._buckets: dict[str, SharedLimit] = {}
        self._idempotency: dict[str, dict[str, bool]] = {}
        self._received: dict[str, int] = {}
        self._by_status: dict[str, dict[str, int]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget records, stats, person state, idempotency keys, switches and rate-limit buckets.

        A request that arrived before the reset and is answered after it changes neither stats nor state.
        """
        with self._lock:
            self._people = {v: PersonStore(self._max_persons, self._max_person_events) for v in self.vendors}
            self._records.clear()
            self._seq = 0
            self._configs = {v: VendorConfig() for v in self.vendors}
            self._buckets = {}
            self._idempotency = {v: {} for v in self.vendors}
            self._received = {v: 0 for v in self.vendors}
            self._by_status = {v: {} for v in self.vendors}

    # -- configuration ----------------------------------------------------

    def config(self, vendor: str) -> dict[str, Any]:
        with self._lock:
            return self._configs[vendor].as_dict()

    def configure(self, vendor: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Apply switches to one vendor; returns its full config.  Raises ValueError/KeyError."""
        with self._lock:
            cfg = self._configs[vendor]
            cfg.update(changes)
            if {"rate_limit", "rate_limit_mode", "rate_limit_shared"} & set(changes):
                self._buckets.pop(vendor, None)
            return cfg.as_dict()

    # -- request lifecycle ------------------------------------------------

    def begin(
        self,
        vendor: str,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        auth_ok: bool,
        idempotency_key: str | None,
        arrived: float | None = None,
    ) -> dict[str, Any]:
        """Record an incoming vendor request (status None until `finish`), arrived at ``arrived``
        (`time.time` seconds; now if None), its ``ts``.

        ``auth_ok`` is the vendor's credential check; while the vendor's ``revoke_key`` is on,
        it is False whatever the request carries.
        """
        record: dict[str, Any] = {
            "seq": 0,
            "vendor": vendor,
            "method": method,
            "path": path,
            "query": query,
            "headers": {k: (REDACTED if k in REDACTED_HEADERS else v) for k, v in headers.items()},
            "auth_ok": auth_ok,
            "body": _decode_body(body),
            "status": None,
            "ts": time.time() if arrived is None else arrived,
            "idempotency_key": idempotency_key,
        }
        with self._lock:
            if self._configs[vendor].revoke_key:
                record["auth_ok"] = False
            self._seq += 1
            record["seq"] = self._seq
            self._records.append(record)
            self._received[vendor] += 1
            self._people[vendor].arrive(self._seq, record)
        return record

    def take_failure(self, vendor: str, text: str = "") -> Failure | None:
        """The outage (`fail_all`) or the first queued `fail_next` failure that applies, if any.

        ``text`` is what an entry's ``match`` is looked for in (the request body and its
        Idempotency-Key); an entry without ``match`` applies to any request, one whose ``match``
        is not in ``text`` stays queued for a later request.
        """
        with self._lock:
            cfg = self._configs[vendor]
            if cfg.fail_all is not None:
                retry = cfg.fail_all_retry_after
                return Failure(cfg.fail_all, _render(retry, cfg))
            for i, entry in enumerate(cfg.fail_next):
                if isinstance(entry, int):
                    del cfg.fail_next[i]
                    return Failure(entry)
                if entry.get("match") is None or entry["match"] in text:
                    del cfg.fail_next[i]
                    return Failure(entry["status"], _render(entry.get("retry_after"), cfg), entry.get("body"))
            return None

    def latency(self, vendor: str) -> float:
        """Seconds to wait before answering: ``latency_ms`` ± ``latency_jitter_ms``, uniform, at least 0."""
        with self._lock:
            cfg = self._configs[vendor]
            ms = cfg.latency_ms + (random.uniform(-1.0, 1.0) * cfg.latency_jitter_ms if cfg.latency_jitter_ms else 0.0)
        return max(0.0, ms) / 1000.0

    def _limit(self, vendor: str, now: float) -> SharedLimit | None:
        """Under the lock: the vendor's counter, made on first use (None without a rate limit)."""
        cfg = self._configs[vendor]
        if cfg.rate_limit is None:
            return None
        limit = self._buckets.get(vendor)
        if limit is None:
            counter = _LIMITS[cfg.rate_limit_mode](cfg.rate_limit)
            limit = self._buckets[vendor] = SharedLimit(counter, cfg.rate_limit_shared, now)
        return limit

    def take_token(self, vendor: str, now: float | None = None) -> str | None:
        """Count one arrival: None if it may proceed, else the Retry-After value for its 429."""
        now = time.monotonic() if now is None else now
        with self._lock:
            limit = self._limit(vendor, now)
            if limit is None or limit.take(now):
                return None
            cfg = self._configs[vendor]
            return format_retry_after(cfg.retry_after, cfg.retry_after_format)

    def rate_limit_headers(self, vendor: str, now: float | None = None) -> list[tuple[str, str]]:
        """``x-ratelimit-limit`` (requests per second) and ``x-ratelimit-remaining`` (left in the
        current window), as Loops sends them while a limit is set; [] without a limit."""
        now = time.monotonic() if now is None else now
        with self._lock:
            limit = self._limit(vendor, now)
            if limit is None:
                return []
            rate = self._configs[vendor].rate_limit
            return [("x-ratelimit-limit", f"{rate:g}"), ("x-ratelimit-remaining", str(max(0, limit.remaining(now))))]

    def reserve_idempotency_key(self, vendor: str, key: str) -> bool:
        """Reserve ``key``; False if it was used successfully or is in flight."""
        with self._lock:
            keys = self._idempotency[vendor]
            if key in keys:
                return False
            keys[key] = False
            return True

    def settle_idempotency_key(self, vendor: str, key: str, succeeded: bool) -> None:
        """Keep a reserved key if the request succeeded, else release it."""
        with self._lock:
            keys = self._idempotency[vendor]
            if succeeded:
                keys[key] = True
            else:
                keys.pop(key, None)

    def finish(self, record: dict[str, Any], status: int, writes: Sequence[PersonWrite] = ()) -> None:
        """Store the status the sandbox answered for ``record`` and, if 2xx, the ``writes`` it made.

        ``writes`` come from `VendorAPI.person_writes` when the vendor's route accepted the
        request; they are folded into the person state in ``seq`` (arrival) order.
        """
        accepted = writes if 200 <= status < 300 else ()
        with self._lock:
            record["status"] = status
            if not self._people[record["vendor"]].depart(record["seq"], record, accepted):
                return  # arrived before a reset
            counts = self._by_status[record["vendor"]]
            counts[str(status)] = counts.get(str(status), 0) + 1

    # -- inspection -------------------------------------------------------

    def requests(
        self,
        vendor: str | None = None,
        since: int | None = None,
        status: int | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Recorded requests, oldest first, filtered; ``limit`` keeps the first N."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for record in self._records:
                if since is not None and record["seq"] <= since:
                    continue
                if vendor is not None and record["vendor"] != vendor:
                    continue
                if status is not None and record["status"] != status:
                    continue
                out.append(dict(record))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def person_states(self, vendor: str | None = None, person: str | None = None) -> dict[str, dict[str, Any]]:
        """``{vendor: {person key: state}}`` of every vendor (or ``vendor``), every person (or ``person``).

        A state is the vendor's three parts (e.g. ConvertLoop's ``attributes``, ``segments``,
        ``events``) and ``writes``, the accepted writes applied; persons sorted by key.
        """
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for name in self.vendors if vendor is None else (vendor,):
                api = self._apis.get(name)
                parts = api.state_parts if api is not None else VendorAPI.state_parts
                as_map = api.members_as_map if api is not None else VendorAPI.members_as_map
                view = self._people[name].view(person)
                out[name] = {key: view[key].render(parts, as_map) for key in sorted(view)}
        return out

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "vendors": {
                    v: {"received": self._received[v], "by_status": dict(self._by_status[v])}
                    for v in self.vendors
                }
            }


def _render(value: int | float | str | None, cfg: VendorConfig) -> str | None:
    return None if value is None else format_retry_after(value, cfg.retry_after_format)


def _decode_body(body: bytes) -> Any:
    """Parsed JSON, else the raw text (None for an empty body)."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
