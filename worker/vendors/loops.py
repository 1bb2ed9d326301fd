"""Loops: contacts are keyed by email or userId; events carry an Idempotency-Key.

Document: ``shared/vendor-docs/loops-api.txt``. ``Authorization: Bearer <key>``.
Segments are Loops mailing lists, mapped by ``LOOPS_MAILING_LISTS``.

Example::

    >>> from worker.events import SegmentEvent, Identity
    >>> from worker.settings import Settings
    >>> e = SegmentEvent(id="e1", created_at="2026-01-01T00:00:00Z", identity=Identity(email="j@a.co"), add=["vip"])
    >>> Loops().build(e, Settings(loops_mailing_lists={"vip": "cl123"})).json
    {'email': 'j@a.co', 'mailingLists': {'cl123': True}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ..settings import Settings
from .base import AnyEvent, Outcome, Request, Vendor, Verdict, secret

IDEMPOTENCY_HEADER = "Idempotency-Key"


def _contact(event: AnyEvent) -> dict[str, str]:
    ident = event.identity
    return {k: v for k, v in (("email", ident.email), ("userId", ident.user_id)) if v}


class Loops(Vendor):
    name = "loops"
    credential_env = "LOOPS_API_KEY"
    reserved_traits: ClassVar[frozenset[str]] = frozenset({"email", "userId", "mailingLists"})

    def person_key(self, identity: Mapping[str, Any]) -> str | None:
        """Loops keys contacts by email, else userId."""
        if identity.get("email"):
            return f"email:{identity['email']}"
        return f"userId:{identity['user_id']}" if identity.get("user_id") else None

    def enabled(self, settings: Settings) -> bool:
        return bool(settings.loops_api_key)

    def base_url(self, settings: Settings) -> str:
        return settings.loops_base_url

    def auth_headers(self, settings: Settings) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret(settings.loops_api_key)}"}

    def refusal(self, event: AnyEvent, settings: Settings) -> str | None:
        if not _contact(event):
            return "Loops needs an email or a user_id (a pid alone is not enough)"
        if event.operation in ("segment", "update"):
            unmapped = [s for s in (*event.add, *event.remove) if s not in settings.loops_mailing_lists]
            if unmapped:
                return f"no LOOPS_MAILING_LISTS entry for segment(s) {', '.join(map(repr, unmapped))}"
        return None

    def build(self, event: AnyEvent, settings: Settings) -> Request:
        contact = _contact(event)
        if event.operation == "identify":
            return Request("PUT", "/contacts/update", {**event.traits, **contact})
        if event.operation == "track":
            body = {**contact, "eventName": event.event, "eventProperties": dict(event.properties)}
            return Request("POST", "/events/send", body, {IDEMPOTENCY_HEADER: event.id})
        lists = settings.loops_mailing_lists
        mailing = {lists[s]: True for s in event.add} | {lists[s]: False for s in event.remove}
        if event.operation == "update":
            update: dict[str, Any] = {**event.traits, **contact}
            if mailing:
                update["mailingLists"] = mailing
            return Request("PUT", "/contacts/update", update)
        return Request("PUT", "/contacts/update", {**contact, "mailingLists": mailing})

    def classify(self, status: int, headers: Mapping[str, str], request: Request) -> Outcome:
        """As the base class, and a 409 on a repeated Idempotency-Key means it was delivered before."""
        if status == 409 and IDEMPOTENCY_HEADER in request.headers:
            return Outcome(Verdict.DELIVERED, status)
        return super().classify(status, headers, request)
