"""Fake ConvertLoop API (``https://api.convertloop.co/v1``).

Auth is HTTP Basic with ``app_id:api_key``.  Endpoints:

- ``POST /people`` -- identify a person / change segments.
- ``POST /event_logs`` -- track an event, optionally updating the person.

Example::

    httpx.post(f"{base}/people", auth=("sandbox-app", "sandbox-convertloop-key"),
               json={"email": "ada@example.com", "add_to_segments": ["Trial"]})
    # -> 200 {"success": true}
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .base import (
    Headers,
    Response,
    RouteHandler,
    VendorAPI,
    basic_auth,
    expect_object,
    is_nonempty_str,
    ok,
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


class ConvertLoopAPI(VendorAPI):
    """ConvertLoop: Basic auth, 422 on domain validation failures."""

    name = "convertloop"
    prefix = "/convertloop/v1"
    credential_defaults = {
        "CONVERTLOOP_APP_ID": "sandbox-app",
        "CONVERTLOOP_API_KEY": "sandbox-convertloop-key",
    }

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
