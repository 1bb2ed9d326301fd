"""The producer API a web handler calls: validate, fan out, enqueue, return.

Each call returns the event id (also the Idempotency-Key) once one message per
target vendor is on that vendor's queue, or, while Redis is unreachable, in the
local spool (:mod:`worker.producer.publisher`). Nothing is enqueued when the input is
bad (:class:`~worker.errors.InvalidEvent`); when neither Redis nor the spool can
take it the call raises :class:`~worker.errors.EnqueueError`; when no vendor is
enabled it raises :class:`~worker.errors.ConfigurationError` (unless
``ALLOW_NO_VENDORS=true``).

The ``prepare_*`` functions validate and fan out without publishing: the asyncio
API (:mod:`worker.aio`) and the after-commit helpers (:mod:`worker.oncommit`)
publish what they return, so every path writes the same messages.

Example::

    >>> import worker
    >>> worker.track("made_sale", email="jill@acme.co", properties={"amount": 1000})  # doctest: +SKIP
    '5f0c6c1e4a1b4a8e9d7c2b1a0f9e8d7c'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pydantic

from ..errors import ConfigurationError, InvalidEvent
from ..events import IdentifyEvent, SegmentEvent, TrackEvent, encode, iso_utc, to_json, utc_now
from ..settings import Settings, get_settings
from ..vendors import VENDORS
from . import publisher

if TYPE_CHECKING:
    from ..testing import Recorder

log = logging.getLogger(__name__)

#: The active test recorder (:mod:`worker.testing`), else None (always, outside tests): while one is set, calls
#: are validated and planned against its settings and handed to it instead of Redis (here and in worker.aio).
recording: Recorder | None = None


def _settings() -> Settings:
    return get_settings() if recording is None else recording.settings


def identify(*, email: str | None = None, user_id: str | None = None, pid: str | None = None,
             traits: Mapping[str, Any] | None = None, vendors: Iterable[str] | None = None) -> str:
    """Create or update a person at every vendor that can carry it."""
    return send(prepare_identify(email=email, user_id=user_id, pid=pid, traits=traits, vendors=vendors))


def track(event: str, *, email: str | None = None, user_id: str | None = None, pid: str | None = None,
          properties: Mapping[str, Any] | None = None, occurred_at: datetime | str | None = None,
          vendors: Iterable[str] | None = None) -> str:
    """Record an event on a person; at most EVENT_PROPERTY_CAP properties."""
    return send(prepare_track(event, email=email, user_id=user_id, pid=pid, properties=properties,
                               occurred_at=occurred_at, vendors=vendors))


def segment(*, email: str | None = None, user_id: str | None = None, pid: str | None = None,
            add: Iterable[str] = (), remove: Iterable[str] = (), vendors: Iterable[str] | None = None) -> str:
    """Add a person to segments and remove them from others."""
    return send(prepare_segment(email=email, user_id=user_id, pid=pid, add=add, remove=remove, vendors=vendors))


# -- validated calls, ready to publish -----------------------------------------

@dataclass(frozen=True, slots=True)
class Prepared:
    """One validated producer call: its event id, the queue payload and its JSON, and the vendors it goes to.

    Every way of publishing (blocking, :mod:`worker.aio`, after a commit: :mod:`worker.oncommit`)
    starts from one of these, so they all validate alike and write identical messages.
    """

    id: str
    payload: dict[str, Any]
    event_json: str
    vendors: list[str]


def prepare_identify(*, email: str | None = None, user_id: str | None = None, pid: str | None = None,
                     traits: Mapping[str, Any] | None = None, vendors: Iterable[str] | None = None) -> Prepared:
    """Validate an identify call and fan it out, without publishing; raises InvalidEvent or ConfigurationError."""
    fields = {"traits": _mapping("traits", traits)}
    return _prepare(IdentifyEvent, _identity(email, user_id, pid), fields, vendors)


def prepare_track(event: str, *, email: str | None = None, user_id: str | None = None, pid: str | None = None,
                  properties: Mapping[str, Any] | None = None, occurred_at: datetime | str | None = None,
                  vendors: Iterable[str] | None = None) -> Prepared:
    """Validate a track call and fan it out, without publishing; raises InvalidEvent or ConfigurationError."""
    if not isinstance(event, str) or not event.strip():
        raise InvalidEvent("event name must be a non-empty string")
    props = _mapping("properties", properties)
    cap = _settings().event_property_cap
    if len(props) > cap:
        raise InvalidEvent(f"properties has {len(props)} keys; at most {cap} are allowed (EVENT_PROPERTY_CAP)")
    fields: dict[str, Any] = {"event": event, "properties": props}
    if occurred_at is not None:
        try:
            fields["occurred_at"] = iso_utc(occurred_at)
        except ValueError as exc:
            raise InvalidEvent(str(exc)) from None
    return _prepare(TrackEvent, _identity(email, user_id, pid), fields, vendors)


def prepare_segment(*, email: str | None = None, user_id: str | None = None, pid: str | None = None,
                    add: Iterable[str] = (), remove: Iterable[str] = (),
                    vendors: Iterable[str] | None = None) -> Prepared:
    """Validate a segment call and fan it out, without publishing; raises InvalidEvent or ConfigurationError."""
    fields = {"add": _names("add", add), "remove": _names("remove", remove)}
    return _prepare(SegmentEvent, _identity(email, user_id, pid), fields, vendors)




# -- validation ---------------------------------------------------------------

def _identity(email: Any, user_id: Any, pid: Any) -> dict[str, Any]:
    return {k: v for k, v in (("email", email), ("user_id", user_id), ("pid", pid)) if v is not None}


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidEvent(f"{name} must be a dict, not {type(value).__name__}")
    return dict(value)


def _names(name: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidEvent(f"{name} must be a list of segment names, not {type(value).__name__}")
    return list(value)


def _build(model: type[IdentifyEvent | TrackEvent | SegmentEvent], identity: dict[str, Any], fields: dict[str, Any]):
    data = {"id": os.urandom(16).hex(), "created_at": utc_now(), "identity": identity, **fields}
    try:
        event = model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise InvalidEvent(_explain(exc)) from None
    payload = encode(event)
    try:
        text = to_json(payload)
    except ValueError as exc:
        raise InvalidEvent(str(exc)) from None
    return event, payload, text


def _explain(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(p) for p in err["loc"] if p != "identity"]
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts)


def plan(event: Any, vendors: Iterable[str] | None, settings: Settings) -> list[str]:
    """The vendors this event goes to. Named vendors must be able to take it."""
    if vendors is None:
        targets = []
        for vendor in VENDORS.values():
            if not vendor.enabled(settings):
                continue
            reason = vendor.refusal(event, settings)
            if reason:
                log.info("skipping %s for %s event %s: %s", vendor.name, event.operation, event.id, reason)
            else:
                targets.append(vendor.name)
        if not targets:
            if not any(vendor.enabled(settings) for vendor in VENDORS.values()):
                _no_vendor_enabled(event, settings)
            else:
                log.warning("%s event %s goes to no vendor: none enabled can carry it", event.operation, event.id)
        return targets
    if isinstance(vendors, (str, bytes)) or not isinstance(vendors, Iterable):
        raise InvalidEvent(f"vendors must be a list of vendor names, not {type(vendors).__name__}")
    names = list(dict.fromkeys(vendors))
    if not names:
        raise InvalidEvent("vendors is empty; leave it out to send to every enabled vendor")
    for name in names:
        named = VENDORS.get(name) if isinstance(name, str) else None
        if named is None:
            raise InvalidEvent(f"unknown vendor {name!r}; known: {', '.join(VENDORS)}")
        if not named.enabled(settings):
            raise InvalidEvent(f"vendor {name!r} is not enabled: set {named.credential_env}")
        reason = named.refusal(event, settings)
        if reason:
            raise InvalidEvent(f"vendor {name!r} cannot take this {event.operation}: {reason}")
    return names


def check_configuration() -> list[str]:
    """The enabled vendors, for a web app to call at startup: it raises what producer calls would.

    ``ConfigurationError`` when no vendor is enabled (unless ALLOW_NO_VENDORS=true: then ``[]``), and
    pydantic's ``ValidationError`` for settings that do not parse (incomplete credentials, a bad number).
    """
    settings = _settings()
    enabled = [vendor.name for vendor in VENDORS.values() if vendor.enabled(settings)]
    if not enabled and not settings.allow_no_vendors:
        raise ConfigurationError(f"no vendor is enabled: set {_credential_variables()} "
                                 "(or ALLOW_NO_VENDORS=true where events may be dropped, e.g. in development)")
    return enabled


def _credential_variables() -> str:
    return "; or ".join(vendor.credential_env for vendor in VENDORS.values())


def _no_vendor_enabled(event: Any, settings: Settings) -> None:
    """No vendor has credentials: a clear error, unless ALLOW_NO_VENDORS says events may go nowhere."""
    if settings.allow_no_vendors:
        log.warning("%s event %s goes nowhere: no vendor is enabled (ALLOW_NO_VENDORS=true)", event.operation, event.id)
        return
    raise ConfigurationError(
        f"no vendor is enabled, so this {event.operation} event would go nowhere: set {_credential_variables()} "
        "(or ALLOW_NO_VENDORS=true where events may be dropped, e.g. in development)")


def _prepare(model: type[IdentifyEvent | TrackEvent | SegmentEvent], identity: dict[str, Any], fields: dict[str, Any],
             vendors: Iterable[str] | None) -> Prepared:
    event, payload, text = _build(model, identity, fields)
    return Prepared(event.id, payload, text, plan(event, vendors, _settings()))


def send(prepared: Prepared) -> str:
    """Publish a prepared call (blocking, bounded by PUBLISH_TIMEOUT); returns its event id."""
    if recording is not None:
        return recording.record(prepared)
    publish(prepared.payload, prepared.vendors, event_json=prepared.event_json)
    return prepared.id


# -- enqueue ------------------------------------------------------------------

def publish(payload: dict[str, Any], vendors: list[str], task_id_suffix: str = "", spool: bool = True,
            event_json: str | None = None) -> None:
    """Put one delivery message per vendor on that vendor's queue (or the local spool), or raise EnqueueError.

    ``event_json`` is the payload's JSON when the caller has it already (it is not encoded twice).
    """
    publisher.publish(payload, vendors, task_id_suffix, spool, event_json)
