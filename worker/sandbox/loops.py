"""Fake Loops API (``https://app.loops.so/api/v1``).

Auth is ``Authorization: Bearer <LOOPS_API_KEY>``.  Validation failures are
400 ``{"success": false, "message": ...}`` like the real API.  Endpoints:

- ``PUT /contacts/update`` -- upsert a contact by email or userId.
- ``POST /contacts/create`` -- create a contact (email required).
- ``POST /events/send`` -- send an event; honours ``Idempotency-Key``
  (a key reused after a successful request answers 409).

While a rate limit is set, every answer carries ``x-ratelimit-limit`` (requests
per second) and ``x-ratelimit-remaining`` (requests left in the current window).

Example::

    httpx.post(f"{base}/events/send", headers={"Authorization": "Bearer sandbox-loops-key"},
               json={"email": "ada@example.com", "eventName": "signup", "plan": "pro"})
    # -> 200 {"success": true}
    # GET /_sandbox/state?vendor=loops -> {"loops": {"ada@example.com": {"properties": {"plan": "pro"},
    #     "mailing_lists": {}, "events": [{"eventName": "signup", "eventProperties": {},
    #     "idempotency_key": null}], "writes": 1}}}

State (``/_sandbox/state``), per contact keyed by ``email``, else ``userId:<userId>``:

- ``properties``: the keys of ``/contacts/update`` and ``/contacts/create`` bodies but
  ``email``, ``userId`` and ``mailingLists``, and the top-level keys of an event but those
  and ``eventName``/``eventProperties`` (the document: event payload properties update
  the contact), the last write winning per key;
- ``mailing_lists``: ``{list id: true|false}``, the last ``mailingLists`` value per list
  (from the contact routes and from events);
- ``events``: ``{"eventName", "eventProperties", "idempotency_key"}`` per event sent.
  A 409 for a reused key is not a write.
"""

from __future__ import annotations

import uuid
from typing import Any

from .base import (
    Headers,
    Op,
    PersonWrite,
    Response,
    RouteHandler,
    VendorAPI,
    bearer_token,
    expect_object,
    is_nonempty_str,
    ok,
    op_event,
    op_member,
    op_set,
    require,
    secret_equals,
)

__all__ = ["LoopsAPI"]

# Namespace for deterministic contact ids (same email -> same id).
CONTACT_ID_NAMESPACE = uuid.UUID("6f1c1a52-6b7e-4d0e-9f55-4c0f5a7d0b01")
# Keys of a contact body that are not contact properties.
CONTACT_KEYS = frozenset({"email", "userId", "mailingLists"})
# Keys of an event body that are not contact properties.
EVENT_KEYS = CONTACT_KEYS | {"eventName", "eventProperties"}


def contact_id(contact: dict[str, Any]) -> str:
    """A stable fake contact id derived from the email or userId."""
    key = contact.get("email") or f"user:{contact.get('userId')}"
    return uuid.uuid5(CONTACT_ID_NAMESPACE, str(key).lower()).hex[:25]


def validate_identity(contact: dict[str, Any]) -> None:
    require(
        is_nonempty_str(contact.get("email")) or is_nonempty_str(contact.get("userId")),
        "An email or userId is required",
    )


def validate_mailing_lists(contact: dict[str, Any]) -> None:
    if "mailingLists" in contact:
        lists = contact["mailingLists"]
        require(
            isinstance(lists, dict) and all(isinstance(v, bool) for v in lists.values()),
            "mailingLists must be an object mapping list ids to true/false",
        )


def person_key(contact: dict[str, Any]) -> str:
    """The state's key of a contact: its email, else ``userId:<userId>``."""
    email = contact.get("email")
    return str(email) if is_nonempty_str(email) else f"userId:{contact.get('userId')}"


def contact_ops(contact: dict[str, Any], not_properties: frozenset[str]) -> list[Op]:
    ops = [op_set(key, value) for key, value in contact.items() if key not in not_properties]
    ops += [op_member(list_id, flag) for list_id, flag in (contact.get("mailingLists") or {}).items()]
    return ops


class LoopsAPI(VendorAPI):
    """Loops: Bearer auth, 400 on validation failures, idempotent events."""

    name = "loops"
    prefix = "/loops/api/v1"
    credential_defaults = {"LOOPS_API_KEY": "sandbox-loops-key"}
    validation_status = 400
    idempotent_routes = frozenset({("POST", "/events/send")})
    rate_limit_headers = True
    state_parts = ("properties", "mailing_lists", "events")
    members_as_map = True

    def check_auth(self, headers: Headers) -> bool:
        return secret_equals(bearer_token(headers), self.credentials["LOOPS_API_KEY"])

    def unauthorized(self) -> Response:
        return 401, {"success": False, "message": "Invalid API key"}

    def routes(self) -> dict[tuple[str, str], RouteHandler]:
        return {
            ("PUT", "/contacts/update"): self.update_contact,
            ("POST", "/contacts/create"): self.create_contact,
            ("POST", "/events/send"): self.send_event,
        }

    def update_contact(self, body: Any) -> Response:
        contact = expect_object(body)
        validate_identity(contact)
        validate_mailing_lists(contact)
        return ok(id=contact_id(contact))

    def create_contact(self, body: Any) -> Response:
        contact = expect_object(body)
        require(is_nonempty_str(contact.get("email")), "An email is required")
        validate_mailing_lists(contact)
        return ok(id=contact_id(contact))

    def send_event(self, body: Any) -> Response:
        event = expect_object(body)
        require(is_nonempty_str(event.get("eventName")), "eventName is required")
        validate_identity(event)
        if "eventProperties" in event:
            require(isinstance(event["eventProperties"], dict), "eventProperties must be an object")
        validate_mailing_lists(event)
        return ok()

    def person_writes(self, method: str, path: str, body: Any, idempotency_key: str | None) -> list[PersonWrite]:
        if path != "/events/send":
            return [(person_key(body), contact_ops(body, CONTACT_KEYS))]
        event = {
            "eventName": body["eventName"],
            "eventProperties": body.get("eventProperties", {}),
            "idempotency_key": idempotency_key,
        }
        return [(person_key(body), [*contact_ops(body, EVENT_KEYS), op_event(event)])]
