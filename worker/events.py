"""What travels on the queue: one validated event, as a plain JSON object.

The producer builds these from keyword arguments; the worker parses them back
(strictly: anything that does not parse is a malformed message).

Example::

    >>> from worker.events import parse_event
    >>> e = parse_event({"id": "e1", "operation": "segment", "created_at": "2026-01-01T00:00:00Z",
    ...                  "identity": {"email": "jill@acme.co"}, "add": ["vip"], "remove": []})
    >>> e.operation, e.identity.email
    ('segment', 'jill@acme.co')
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    field_validator,
    model_validator,
)

#: Longest email, user id or pid we accept.
MAX_IDENTITY_LENGTH = 512
#: Longest event name, segment name or property key.
MAX_NAME_LENGTH = 255
#: Most segments one segment() call may add plus remove.
MAX_SEGMENTS = 100
#: Largest event, JSON-encoded, that the producer accepts.
MAX_EVENT_BYTES = 32 * 1024

Operation = Literal["identify", "track", "segment"]
OPERATIONS: tuple[str, ...] = ("identify", "track", "segment")

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class Identity(BaseModel):
    """Who the event is about; at least one of the three is set."""

    model_config = _STRICT

    email: Annotated[str, Field(min_length=3, max_length=MAX_IDENTITY_LENGTH)] | None = None
    user_id: Annotated[str, Field(min_length=1, max_length=MAX_IDENTITY_LENGTH)] | None = None
    pid: Annotated[str, Field(min_length=1, max_length=MAX_IDENTITY_LENGTH)] | None = None

    @field_validator("email")
    @classmethod
    def _email_shape(cls, v: str | None) -> str | None:
        if v is not None and ("@" not in v or any(c.isspace() for c in v)):
            raise ValueError(f"{v!r} is not an email address")
        return v

    @field_validator("user_id", "pid")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be blank")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> Identity:
        if not (self.email or self.user_id or self.pid):
            raise ValueError("an identity is required: give email, user_id or pid")
        return self

    def as_dict(self) -> dict[str, str]:
        """The identity keys that are set, e.g. ``{"email": "jill@acme.co"}``."""
        return {k: v for k, v in (("pid", self.pid), ("user_id", self.user_id), ("email", self.email)) if v}


Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
JsonObject = dict[Name, JsonValue]


class _Event(BaseModel):
    model_config = _STRICT

    id: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
    identity: Identity
    created_at: str


class IdentifyEvent(_Event):
    operation: Literal["identify"] = "identify"
    traits: JsonObject = Field(default_factory=dict)


class TrackEvent(_Event):
    operation: Literal["track"] = "track"
    event: Name
    properties: JsonObject = Field(default_factory=dict)
    occurred_at: str | None = None

    @field_validator("event")
    @classmethod
    def _event_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("event name must be a non-empty string")
        return v


class SegmentEvent(_Event):
    operation: Literal["segment"] = "segment"
    add: list[Name] = Field(default_factory=list)
    remove: list[Name] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_segment(self) -> SegmentEvent:
        if not (self.add or self.remove):
            raise ValueError("segment() needs at least one segment to add or remove")
        if len(self.add) + len(self.remove) > MAX_SEGMENTS:
            raise ValueError(f"at most {MAX_SEGMENTS} segments per call")
        return self


class UpdateEvent(_Event):
    """Identify and segment calls about one person, merged into one update (:func:`merge`); never on a queue.

    ``merged`` names the calls' task ids, oldest first; ``id`` is the newest call's event id.
    """

    operation: Literal["update"] = "update"
    traits: JsonObject = Field(default_factory=dict)
    add: list[Name] = Field(default_factory=list)
    remove: list[Name] = Field(default_factory=list)
    merged: tuple[str, ...] = ()


def merge(events: list[IdentifyEvent | SegmentEvent], merged: tuple[str, ...] = ()) -> UpdateEvent:
    """One update whose effect equals applying ``events`` in order.

    Traits: the last value of each key wins, and a key only an older call set is kept. Segments: the
    last add or remove of each name wins. Identity: the last value of each key (pid, user_id, email).

    >>> a = IdentifyEvent(id="1", created_at="t", identity=Identity(email="j@a.co"), traits={"plan": "old", "co": "A"})
    >>> b = SegmentEvent(id="2", created_at="t", identity=Identity(email="j@a.co"), add=["vip"])
    >>> c = IdentifyEvent(id="3", created_at="t", identity=Identity(email="j@a.co"), traits={"plan": "new"})
    >>> d = SegmentEvent(id="4", created_at="t", identity=Identity(email="j@a.co"), remove=["vip"], add=["paid"])
    >>> u = merge([a, b, c, d])
    >>> u.traits, u.add, u.remove, u.id
    ({'plan': 'new', 'co': 'A'}, ['paid'], ['vip'], '4')
    """
    traits: dict[str, Any] = {}
    membership: dict[str, bool] = {}
    identity: dict[str, str] = {}
    for event in events:
        identity.update(event.identity.as_dict())
        if isinstance(event, IdentifyEvent):
            traits.update(event.traits)
        else:
            membership.update({name: True for name in event.add})
            membership.update({name: False for name in event.remove})
    last = events[-1]
    # Every part was validated when it was made: construct without validating again.
    return UpdateEvent.model_construct(
        id=last.id, created_at=last.created_at, identity=Identity.model_validate(identity), traits=traits,
        add=[n for n, on in membership.items() if on], remove=[n for n, on in membership.items() if not on],
        merged=merged, operation="update")


Event = Annotated[IdentifyEvent | TrackEvent | SegmentEvent, Field(discriminator="operation")]
_EVENT = TypeAdapter(Event)


def parse_event(payload: Any) -> IdentifyEvent | TrackEvent | SegmentEvent:
    """Parse a queue payload; raises :class:`pydantic.ValidationError` when malformed."""
    return _EVENT.validate_python(payload)


def encode(event: _Event) -> dict[str, Any]:
    """The event as the JSON object that goes on the queue. Fields left unset (``None``: an identity's other keys,
    a track's ``occurred_at``) are left out; :func:`parse_event` reads them back as ``None``. JSON nulls inside
    properties or traits are values, and stay."""
    return event.model_dump(mode="json", exclude_none=True)


def to_json(payload: dict[str, Any]) -> str:
    """The compact JSON of an event; raises ValueError for NaN/Infinity or an event over MAX_EVENT_BYTES."""
    try:
        text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    except ValueError:
        raise ValueError("values must be JSON: NaN and Infinity are not") from None
    if len(text) > MAX_EVENT_BYTES:
        raise ValueError(f"event is {len(text)} bytes as JSON; the limit is {MAX_EVENT_BYTES}")
    return text


def check_encodable(payload: dict[str, Any]) -> int:
    """Size in bytes of the JSON encoding; raises ValueError for NaN/Infinity or absurd sizes."""
    return len(to_json(payload))


def iso_utc(value: datetime | str) -> str:
    """An ISO 8601 UTC timestamp (``...Z``); naive datetimes are taken as UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        except ValueError:
            raise ValueError(f"occurred_at {value!r} is not an ISO 8601 timestamp") from None
    if not isinstance(value, datetime):
        raise ValueError(f"occurred_at must be a datetime or an ISO 8601 string, not {type(value).__name__}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def utc_now() -> str:
    return iso_utc(datetime.now(UTC))


def utc_iso(unix_time: float) -> str:
    """A Unix time as an ISO 8601 UTC timestamp, like :func:`utc_now`."""
    return iso_utc(datetime.fromtimestamp(unix_time, UTC))
