"""Test helpers for apps that use this library: producer calls are validated as in production and recorded.

While a :class:`Recorder` is active, every ``worker.identify`` / ``track`` / ``segment`` call — blocking,
:mod:`worker.aio`, or :mod:`worker.oncommit` once its transaction commits — runs the production code
up to the publish: the same validation (:class:`~worker.errors.InvalidEvent`), the same event id, the
same vendor planning. Then, instead of going to Redis, it is recorded. Nothing here opens a socket,
reads or writes the spool or starts the spool flusher.

Vendor planning needs vendor settings; tests rarely have credentials, so a recorder **pretends that
every vendor is enabled** (fake credentials fill in whatever the environment does not set) unless the
test says otherwise: ``recorder(vendors=["loops"])`` enables only Loops, ``recorder(vendors=[])`` none.
Every other setting comes from the environment (``EVENT_PROPERTY_CAP``, ``LOOPS_MAILING_LISTS``...),
or from keyword arguments naming a setting: ``recorder(loops_mailing_lists={"vip": "cl123"})``.

In a pytest suite the ``vdw_events`` fixture (a pytest plugin this package registers; docs/testing.md)
is a started recorder. Example::

    >>> import worker, worker.testing
    >>> with worker.testing.recorder() as events:
    ...     event_id = worker.track("signed_up", email="jill@acme.co", properties={"plan": "pro"})
    >>> [call.id for call in events.tracked("signed_up", email="jill@acme.co")] == [event_id]
    True
    >>> events.assert_tracked("signed_up", properties={"plan": "free"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    AssertionError: expected a track call matching event='signed_up', properties ⊇ {'plan': 'free'}; 0 of the 1 ...
      1. track 'signed_up' email='jill@acme.co' properties={'plan': 'pro'} -> convertloop, loops, conveyour
           - properties['plan']: 'pro' != expected 'free'
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import SecretStr

from .events import iso_utc
from .producer import api as producer
from .producer.api import Prepared
from .settings import Settings, get_settings
from .vendors import VENDORS

__all__ = ["FAKE_CREDENTIALS", "Call", "Recorder", "record", "recorder"]

_FAKE = SecretStr("vdw-testing-not-a-credential")

#: The settings a recorder fills in for a vendor it pretends is enabled and the environment has no credentials
#: for; a vendor it disables has them cleared. Never sent anywhere: a recorder publishes nothing.
FAKE_CREDENTIALS: dict[str, dict[str, Any]] = {
    "convertloop": {"convertloop_app_id": _FAKE, "convertloop_api_key": _FAKE},
    "loops": {"loops_api_key": _FAKE},
    "conveyour": {"conveyour_appkey": _FAKE, "conveyour_token": _FAKE,
                  "conveyour_base_url": "https://conveyour.invalid/api"},
}

#: An environment variable prefix nothing uses: settings validated from keyword arguments alone.
_NO_ENV = "VDW_TESTING_NO_ENVIRONMENT_"

#: The started recorders, innermost last: the last one records (``producer.recording``).
_active: list[Recorder] = []
_active_lock = threading.Lock()


@dataclass(frozen=True)
class Call:
    """One recorded producer call: what it would have published, and where to."""

    #: "identify", "track" or "segment".
    operation: str
    #: The event id the call returned.
    id: str
    #: The identity as given: ``{"email": ..., "user_id": ..., "pid": ...}`` (only the keys given).
    identity: dict[str, str]
    #: The vendors it would go to (vendor planning, as in production).
    vendors: list[str]
    #: track: the event name, its properties and its occurred_at (normalised to ISO UTC, as published).
    event: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    occurred_at: str | None = None
    #: identify: the traits.
    traits: dict[str, Any] = field(default_factory=dict)
    #: segment: the segments added and removed.
    add: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    #: The whole event as it would go on the queues (id, created_at, identity, ...).
    payload: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_prepared(cls, prepared: Prepared) -> Call:
        p = prepared.payload
        identity = {k: v for k, v in p["identity"].items() if v is not None}
        return cls(operation=p["operation"], id=prepared.id, identity=identity,
                   vendors=list(prepared.vendors), event=p.get("event"), properties=dict(p.get("properties") or {}),
                   occurred_at=p.get("occurred_at"), traits=dict(p.get("traits") or {}), add=list(p.get("add") or []),
                   remove=list(p.get("remove") or []), payload=p)

    @property
    def email(self) -> str | None:
        return self.identity.get("email")

    @property
    def user_id(self) -> str | None:
        return self.identity.get("user_id")

    @property
    def pid(self) -> str | None:
        return self.identity.get("pid")

    def describe(self) -> str:
        """One line, e.g. ``track 'signed_up' email='jill@acme.co' properties={'plan': 'pro'} -> convertloop``."""
        parts = [self.operation]
        if self.event is not None:
            parts.append(repr(self.event))
        parts += [f"{k}={v!r}" for k, v in self.identity.items()]
        if self.operation == "identify":
            parts.append(f"traits={self.traits!r}")
        elif self.operation == "track":
            parts.append(f"properties={self.properties!r}")
            if self.occurred_at:
                parts.append(f"occurred_at={self.occurred_at!r}")
        else:
            parts += [f"add={self.add!r}", f"remove={self.remove!r}"]
        parts.append("-> " + (", ".join(self.vendors) or "no vendor"))
        return " ".join(parts)


class Recorder:
    """Records producer calls while started, instead of publishing them; see the module's docs.

    ``with recorder() as events: ...`` or ``events = record(); ...; events.stop()``. Recording is
    process-wide (a web test client may run the app in another thread); when recorders are nested the
    innermost one records. ``len(events)``, ``iter(events)``, ``events[i]`` and :attr:`calls` give
    the calls in the order they were published (an after-commit call: at the commit).
    """

    #: The settings calls are validated and planned against while this recorder records (set by :meth:`start`).
    settings: Settings

    def __init__(self, *, vendors: Iterable[str] | None = None, **settings: Any) -> None:
        if vendors is not None:
            if isinstance(vendors, str):
                raise TypeError("vendors must be a list of vendor names, e.g. vendors=['loops']")
            vendors = list(vendors)
            unknown = [v for v in vendors if v not in VENDORS]
            if unknown:
                raise ValueError(f"unknown vendor(s) {unknown}; known: {', '.join(VENDORS)}")
        unknown = sorted(set(settings) - set(Settings.model_fields))
        if unknown:
            raise TypeError(f"not a setting: {', '.join(unknown)} (worker.settings.Settings names them)")
        self._vendors = vendors
        self._overrides = settings
        self._calls: list[Call] = []
        self._lock = threading.Lock()

    # -- starting and stopping ------------------------------------------------------------

    def start(self) -> Recorder:
        """Record from now on (until :meth:`stop`); returns the recorder."""
        settings = pretend_settings(self._vendors, **self._overrides)
        with _active_lock:
            if self in _active:
                raise RuntimeError("this recorder is already recording")
            self.settings = settings
            _active.append(self)
            producer.recording = self
        return self

    def stop(self) -> None:
        """Stop recording (the calls recorded stay readable); calls go to the next outer recorder, or to Redis."""
        with _active_lock:
            if self in _active:
                _active.remove(self)
            producer.recording = _active[-1] if _active else None

    @property
    def active(self) -> bool:
        return self in _active

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, prepared: Prepared) -> str:
        """Record a validated call in place of publishing it (the producer's hook); returns its event id."""
        call = Call.from_prepared(prepared)
        with self._lock:
            self._calls.append(call)
        return prepared.id

    # -- what was recorded ------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """Every recorded call, oldest first (a copy)."""
        with self._lock:
            return list(self._calls)

    def clear(self) -> None:
        """Forget the calls recorded so far (recording goes on)."""
        with self._lock:
            self._calls.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._calls)

    def __iter__(self) -> Iterator[Call]:
        return iter(self.calls)

    def __getitem__(self, index: int) -> Call:
        with self._lock:
            return self._calls[index]

    def __repr__(self) -> str:
        state = "recording" if self.active else "stopped"
        return f"<Recorder {state}, {len(self)} call(s)>"

    # -- finding calls --------------------------------------------------------------------
    #
    # Each criterion given must hold; one left out (None) matches anything. Identity keys and the event
    # name match exactly; traits / properties match as a subset (the keys given, with equal values); add /
    # remove / vendors as a subset too (each name given is there).

    def tracked(self, event: str | None = None, *, email: str | None = None, user_id: str | None = None,
                pid: str | None = None, properties: Mapping[str, Any] | None = None,
                occurred_at: datetime | str | None = None, vendors: Iterable[str] | None = None) -> list[Call]:
        """The track calls matching, oldest first (an empty list is false)."""
        return self._find(_criteria("track", event=event, email=email, user_id=user_id, pid=pid,
                                    properties=properties, occurred_at=occurred_at, vendors=vendors))

    def identified(self, *, email: str | None = None, user_id: str | None = None, pid: str | None = None,
                   traits: Mapping[str, Any] | None = None, vendors: Iterable[str] | None = None) -> list[Call]:
        """The identify calls matching, oldest first."""
        return self._find(_criteria("identify", email=email, user_id=user_id, pid=pid, traits=traits,
                                    vendors=vendors))

    def segmented(self, *, email: str | None = None, user_id: str | None = None, pid: str | None = None,
                  add: Iterable[str] | None = None, remove: Iterable[str] | None = None,
                  vendors: Iterable[str] | None = None) -> list[Call]:
        """The segment calls matching, oldest first."""
        return self._find(_criteria("segment", email=email, user_id=user_id, pid=pid, add=add, remove=remove,
                                    vendors=vendors))

    def assert_tracked(self, event: str | None = None, *, email: str | None = None, user_id: str | None = None,
                       pid: str | None = None, properties: Mapping[str, Any] | None = None,
                       occurred_at: datetime | str | None = None, vendors: Iterable[str] | None = None,
                       times: int | None = None) -> list[Call]:
        """The matching track calls; AssertionError, listing what was recorded and why each differs, unless
        there is one at least (``times=None``) or exactly ``times`` (``times=0``: none)."""
        return self._assert(_criteria("track", event=event, email=email, user_id=user_id, pid=pid,
                                      properties=properties, occurred_at=occurred_at, vendors=vendors), times)

    def assert_identified(self, *, email: str | None = None, user_id: str | None = None, pid: str | None = None,
                          traits: Mapping[str, Any] | None = None, vendors: Iterable[str] | None = None,
                          times: int | None = None) -> list[Call]:
        """As :meth:`assert_tracked`, for identify calls."""
        return self._assert(_criteria("identify", email=email, user_id=user_id, pid=pid, traits=traits,
                                      vendors=vendors), times)

    def assert_segmented(self, *, email: str | None = None, user_id: str | None = None, pid: str | None = None,
                         add: Iterable[str] | None = None, remove: Iterable[str] | None = None,
                         vendors: Iterable[str] | None = None, times: int | None = None) -> list[Call]:
        """As :meth:`assert_tracked`, for segment calls."""
        return self._assert(_criteria("segment", email=email, user_id=user_id, pid=pid, add=add, remove=remove,
                                      vendors=vendors), times)

    def _find(self, criteria: dict[str, Any]) -> list[Call]:
        return [call for call in self.calls if not mismatches(call, criteria)]

    def _assert(self, criteria: dict[str, Any], times: int | None) -> list[Call]:
        calls = self.calls
        found = [call for call in calls if not mismatches(call, criteria)]
        if (found and times is None) or len(found) == times:
            return found
        operation = criteria["operation"]
        wanted = ("an" if operation[0] in "aeiou" else "a") if times is None else f"exactly {times}"
        lines = [f"expected {wanted} {operation} call matching {describe(criteria)}; "
                 f"{len(found)} of the {len(calls)} recorded call(s) match"]
        if not calls:
            lines.append("nothing was recorded")
        for n, call in enumerate(calls, 1):
            lines.append(f"  {n}. {call.describe()}")
            lines += [f"       - {why}" for why in mismatches(call, criteria)] or ["       = matches"]
        raise AssertionError("\n".join(lines))


def recorder(*, vendors: Iterable[str] | None = None, **settings: Any) -> Recorder:
    """A recorder, started by ``with``: ``with worker.testing.recorder() as events: ...``.

    ``vendors``: the vendors that count as enabled (default: all); ``settings``: settings to use instead of
    the environment's, by name, e.g. ``loops_mailing_lists={"vip": "cl123"}``.
    """
    return Recorder(vendors=vendors, **settings)


def record(*, vendors: Iterable[str] | None = None, **settings: Any) -> Recorder:
    """A started recorder: ``events = worker.testing.record()``; ``events.stop()`` when done."""
    return Recorder(vendors=vendors, **settings).start()


def pretend_settings(vendors: Iterable[str] | None = None, **overrides: Any) -> Settings:
    """The environment's settings (with ``overrides``), every vendor in ``vendors`` (default: all) enabled —
    its own credentials if the environment has them, else :data:`FAKE_CREDENTIALS` — and every other disabled."""
    base = get_settings()
    if overrides:  # validated with the rest, each replacing the environment's value (not merged with it)
        values = {name: getattr(base, name) for name in Settings.model_fields}
        base = Settings(_env_prefix=_NO_ENV, **{**values, **overrides})
    enabled = set(VENDORS) if vendors is None else set(vendors)
    update: dict[str, Any] = {}
    for name, fields in FAKE_CREDENTIALS.items():
        if name not in enabled:
            update.update(dict.fromkeys(fields))
        elif not VENDORS[name].enabled(base):
            update.update(fields)
    settings = base.model_copy(update=update)
    wrong = [name for name, vendor in VENDORS.items() if vendor.enabled(settings) != (name in enabled)]
    if wrong:  # a vendor FAKE_CREDENTIALS does not know
        raise RuntimeError(f"worker.testing cannot enable or disable vendor(s) {wrong}: add them to FAKE_CREDENTIALS")
    return settings


# -- matching -------------------------------------------------------------------------------


def _criteria(operation: str, **given: Any) -> dict[str, Any]:
    criteria: dict[str, Any] = {"operation": operation}
    for key, value in given.items():
        if value is None:
            continue
        if key == "occurred_at":
            value = iso_utc(value)
        elif key in ("add", "remove", "vendors"):
            if isinstance(value, str):
                raise TypeError(f"{key} must be a list of names, e.g. {key}=[{value!r}]")
            value = list(value)
        elif key in ("traits", "properties"):
            value = dict(value)
        criteria[key] = value
    return criteria


def describe(criteria: Mapping[str, Any]) -> str:
    """The criteria in words, e.g. ``event='signed_up', email='jill@acme.co', traits ⊇ {'plan': 'pro'}``."""
    parts = []
    for key, value in criteria.items():
        if key == "operation":
            continue
        if key in ("traits", "properties", "add", "remove", "vendors"):
            parts.append(f"{key} ⊇ {value!r}")
        else:
            parts.append(f"{key}={value!r}")
    return ", ".join(parts) or "(anything)"


def mismatches(call: Call, criteria: Mapping[str, Any]) -> list[str]:
    """Why ``call`` does not match ``criteria`` (empty: it matches)."""
    if call.operation != criteria["operation"]:
        article = "an" if call.operation[0] in "aeiou" else "a"
        return [f"{article} {call.operation} call, not {criteria['operation']}"]
    out = []
    for key, wanted in criteria.items():
        if key == "operation":
            continue
        if key in ("email", "user_id", "pid"):
            have = call.identity.get(key)
            if have != wanted:
                out.append(f"{key}: {have!r} != expected {wanted!r}" if have is not None
                           else f"{key}: not given (expected {wanted!r})")
        elif key in ("event", "occurred_at"):
            have = getattr(call, key)
            if have != wanted:
                out.append(f"{key}: {have!r} != expected {wanted!r}")
        elif key in ("traits", "properties"):
            have_map = getattr(call, key)
            for name, value in wanted.items():
                if name not in have_map:
                    out.append(f"{key}[{name!r}]: missing (expected {value!r})")
                elif have_map[name] != value:
                    out.append(f"{key}[{name!r}]: {have_map[name]!r} != expected {value!r}")
        elif key in ("add", "remove", "vendors"):
            have_list = getattr(call, key)
            missing = [name for name in wanted if name not in have_list]
            if missing:
                out.append(f"{key}: {have_list!r} lacks {missing!r}")
    return out
