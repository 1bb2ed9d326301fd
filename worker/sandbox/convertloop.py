"""Fake ConvertLoop API (``https://api.convertloop.co/v1``).

Auth is HTTP Basic with ``app_id:api_key``.  Endpoints:

- ``POST /people`` -- identify a person / change segments.
- ``POST /event_logs`` -- track an event, optionally updating the person.

Example::

    httpx.post(f"{base}/people", auth=("sandbox-app", "sandbox-convertloop-key"),
               json={"email": "ada@example.com", "plan": "pro", "add_to_segments": "Trial, VIP"})
    # -> 200 {"success": true}
    # GET /_sandbox/state?vendor=convertloop -> {"convertloop": {"ada@example.com":
    #     {"attributes": {"plan": "pro"}, "segments": ["Trial", "VIP"], "events": [], "writes": 1}}}

State (``/_sandbox/state``), per person keyed by ``email``, else ``user_id``, else
``pid`` (of the ``/people`` body or of an event's ``person``):

- ``attributes``: every other key but ``add_to_segments``, ``remove_from_segments``
  and ``resubscribe``, the last write winning per key;
- ``segments``: ``add_to_segments`` applied, then ``remove_from_segments`` (a list of
  names or one string of comma-separated names);
- ``events``: ``{"name", "metadata", "occurred_at"}`` per ``/event_logs``, where
  ``occurred_at`` is the ``ocurred_at`` key, else ``occured_at``, else null (the
  document's two spellings; ``occurred_at``, which it never uses, is not read).
  An event's ``person`` updates attributes and segments as ``/people`` does; an
  event without a ``person`` is accepted but belongs to nobody's state.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .base import (
    Headers,
    Op,
    PersonWrite,
    Response,
    RouteHandler,
    VendorAPI,
    basic_auth,
    expect_object,
    is_nonempty_str,
    ok,
    op_event,
    op_member,
    op_set,
    require,
    secret_equals,
)

__all__ = ["ConvertLoopAPI"]

# Keys of which at least one must identify the person.
IDENTITY_KEYS = ("pid", "user_id", "email")
# Keys that, if present, name segments: a list of names or one string of comma-separated names
# (the document gives their type as "string").
SEGMENT_KEYS = ("add_to_segments", "remove_from_segments")
# Accepted spellings of the event timestamp (the vendor's docs use several).
OCCURRED_AT_KEYS = ("ocurred_at", "occured_at", "occurred_at")
# The spellings an event's ``occurred_at`` in /_sandbox/state is read from, first found wins (the document's).
STATE_OCCURRED_AT_KEYS = ("ocurred_at", "occured_at")
# Keys of a person that are not custom attributes.
NOT_ATTRIBUTES = frozenset({*IDENTITY_KEYS, *SEGMENT_KEYS, "resubscribe"})


def parse_iso8601(value: object) -> bool:
    """True if ``value`` is an ISO-8601 string (a trailing ``Z`` is accepted)."""
    if not isinstance(value, str) or not value:
        return False
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def segment_names(value: object) -> list[str]:
    """The segment names of an ``add_to_segments``/``remove_from_segments`` value, in order.

    >>> segment_names(["Trial", "VIP"]), segment_names("Trial, VIP"), segment_names("Trial")
    (['Trial', 'VIP'], ['Trial', 'VIP'], ['Trial'])
    """
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return list(value) if isinstance(value, list) else []


def validate_person(person: dict[str, Any], where: str = "") -> None:
    """Check identity and segment keys of a person object (422 on failure)."""
    require(
        any(is_nonempty_str(person.get(key)) for key in IDENTITY_KEYS),
        f"{where}one of pid, user_id or email is required (non-empty string)",
    )
    for key in SEGMENT_KEYS:
        if key in person:
            segments = person[key]
            require(
                (isinstance(segments, list) and all(is_nonempty_str(s) for s in segments))
                or (isinstance(segments, str) and bool(segment_names(segments))),
                f"{where}{key} must be a list of non-empty strings or a string of comma-separated names",
            )


def person_key(person: dict[str, Any]) -> str | None:
    """The state's key of a person: its email, else user_id, else pid (None without any)."""
    for key in ("email", "user_id", "pid"):
        if is_nonempty_str(person.get(key)):
            return str(person[key])
    return None


def person_ops(person: dict[str, Any]) -> list[Op]:
    """Attributes (last write wins), then segments added, then segments removed."""
    ops = [op_set(key, value) for key, value in person.items() if key not in NOT_ATTRIBUTES]
    ops += [op_member(name, True) for name in segment_names(person.get("add_to_segments"))]
    ops += [op_member(name, False) for name in segment_names(person.get("remove_from_segments"))]
    return ops


class ConvertLoopAPI(VendorAPI):
    """ConvertLoop: Basic auth, 422 on domain validation failures."""

    name = "convertloop"
    prefix = "/convertloop/v1"
    credential_defaults = {
        "CONVERTLOOP_APP_ID": "sandbox-app",
        "CONVERTLOOP_API_KEY": "sandbox-convertloop-key",
    }
    state_parts = ("attributes", "segments", "events")

    def check_auth(self, headers: Headers) -> bool:
        creds = basic_auth(headers)
        if creds is None:
            return False
        app_id, api_key = creds
        # Evaluate both comparisons so timing does not reveal which one failed.
        app_ok = secret_equals(app_id, self.credentials["CONVERTLOOP_APP_ID"])
        key_ok = secret_equals(api_key, self.credentials["CONVERTLOOP_API_KEY"])
        return app_ok and key_ok

    def routes(self) -> dict[tuple[str, str], RouteHandler]:
        return {("POST", "/people"): self.people, ("POST", "/event_logs"): self.event_logs}

    def people(self, body: Any) -> Response:
        validate_person(expect_object(body))
        return ok()

    def event_logs(self, body: Any) -> Response:
        event = expect_object(body)
        require(is_nonempty_str(event.get("name")), "name is required (non-empty string)")
        if "person" in event:
            person = event["person"]
            require(isinstance(person, dict), "person must be an object")
            validate_person(person, "person: ")
        if "metadata" in event:
            require(isinstance(event["metadata"], dict), "metadata must be an object")
        for key in OCCURRED_AT_KEYS:
            if key in event:
                require(parse_iso8601(event[key]), f"{key} must be an ISO-8601 datetime string")
        return ok()

    def person_writes(self, method: str, path: str, body: Any, idempotency_key: str | None) -> list[PersonWrite]:
        person = body if path == "/people" else body.get("person") or {}
        key = person_key(person)
        if key is None:
            return []
        ops = person_ops(person)
        if path == "/event_logs":
            occurred_at = next((body[k] for k in STATE_OCCURRED_AT_KEYS if k in body), None)
            event = {"name": body["name"], "metadata": body.get("metadata", {}), "occurred_at": occurred_at}
            ops.append(op_event(event))
        return [(key, ops)]
