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
               json={"email": "ada@example.com", "eventName": "signup"})
    # -> 200 {"success": true}
"""

from __future__ import annotations

import uuid
from typing import Any

from .base import (
    Headers,
    Response,
    RouteHandler,
    VendorAPI,
    bearer_token,
    expect_object,
    is_nonempty_str,
    ok,
    require,
    secret_equals,
)

__all__ = ["LoopsAPI"]

# Namespace for deterministic contact ids (same email -> same id).
CONTACT_ID_NAMESPACE = uuid.UUID("6f1c1a52-6b7e-4d0e-9f55-4c0f5a7d0b01")


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


class LoopsAPI(VendorAPI):
    """Loops: Bearer auth, 400 on validation failures, idempotent events."""

    name = "loops"
    prefix = "/loops/api/v1"
    credential_defaults = {"LOOPS_API_KEY": "sandbox-loops-key"}
    validation_status = 400
    idempotent_routes = frozenset({("POST", "/events/send")})
    rate_limit_headers = True

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
