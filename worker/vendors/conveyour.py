"""ConveYour: the analytics identify and track calls; segments are ``tags``.

Document: ``shared/vendor-docs/conveyour-api.txt``. Headers
``x-conveyour-appkey`` and ``x-conveyour-token``. The contact id is the
user_id when given, else the email.

Identify and segment calls (both ``POST /analytics/identify``) may be sent in
bulk: an array of the same objects ("Identify Multiple Contacts in One HTTP
Call"). A rejected bulk request is mapped item by item from its ``errors:
[{"index": i, "message": ...}]``; without them every item is sent again.

Example::

    >>> from worker.events import SegmentEvent, Identity
    >>> e = SegmentEvent(id="e1", created_at="2026-01-01T00:00:00Z", identity=Identity(user_id="42"),
    ...                  add=["vip"], remove=["trial"])
    >>> ConveYour().build(e, None).json
    {'id': '42', 'traits': {'tags': {'add': ['vip'], 'remove': ['trial']}}}
    >>> ConveYour().build_batch([e, e], None).json[1]["id"]
    '42'
    >>> body = '{"errors": [{"index": 1, "message": "id is required"}]}'
    >>> [o.verdict.value for o in ConveYour().classify_batch(422, {}, body, None, 2)]
    ['resend', 'rejected']
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..settings import Settings
from .base import AnyEvent, Outcome, Request, Vendor, Verdict, secret

#: Statuses of a bulk request that may be about some of its items; split to find out which.
#: Any other 4xx (401, 403, 404, ...) is about the request itself and holds for every item.
ITEM_STATUSES = frozenset({400, 413, 422})


def contact_id(event: AnyEvent) -> str | None:
    return event.identity.user_id or event.identity.email


class ConveYour(Vendor):
    name = "conveyour"
    credential_env = "CONVEYOUR_APPKEY, CONVEYOUR_TOKEN and CONVEYOUR_BASE_URL"
    reserved_traits: ClassVar[frozenset[str]] = frozenset({"tags"})

    def person_key(self, identity: Mapping[str, Any]) -> str | None:
        """The contact id: the user_id, else the email."""
        cid = identity.get("user_id") or identity.get("email")
        return f"id:{cid}" if cid else None

    def mergeable(self, event: AnyEvent) -> bool:
        """As the base class; and an identify with an operator value (``{"$inc": 1}``) goes alone: two
        increments are not one."""
        if event.operation == "identify" and any(
                isinstance(v, dict) and any(str(k).startswith("$") for k in v) for v in event.traits.values()):
            return False
        return super().mergeable(event)

    def enabled(self, settings: Settings) -> bool:
        return bool(settings.conveyour_appkey and settings.conveyour_token and settings.conveyour_base_url)

    def base_url(self, settings: Settings) -> str:
        return settings.conveyour_base_url or ""

    def auth_headers(self, settings: Settings) -> dict[str, str]:
        return {
            "x-conveyour-appkey": secret(settings.conveyour_appkey),
            "x-conveyour-token": secret(settings.conveyour_token),
        }

    def refusal(self, event: AnyEvent, settings: Settings) -> str | None:
        if not contact_id(event):
            return "ConveYour needs a user_id or an email (a pid alone is not enough)"
        return None

    def build(self, event: AnyEvent, settings: Settings) -> Request:
        cid = contact_id(event)
        if event.operation == "identify":
            return Request("POST", "/analytics/identify", {"id": cid, "traits": dict(event.traits)})
        if event.operation == "track":
            events = [{"event": event.event, "properties": dict(event.properties)}]
            return Request("POST", "/analytics/track", {"id": cid, "events": events})
        tags = {"add": list(event.add), "remove": list(event.remove)}
        if event.operation == "update":
            traits = {**event.traits, **({"tags": tags} if event.add or event.remove else {})}
            return Request("POST", "/analytics/identify", {"id": cid, "traits": traits})
        return Request("POST", "/analytics/identify", {"id": cid, "traits": {"tags": tags}})

    # -- bulk identify ----------------------------------------------------------

    def batch_size(self, settings: Settings) -> int:
        return settings.conveyour_batch_size

    def batch_max_wait(self, settings: Settings) -> float:
        return settings.conveyour_batch_max_wait

    def batchable(self, event: AnyEvent) -> bool:
        return event.operation in ("identify", "segment", "update")

    def build_batch(self, events: Sequence[AnyEvent], settings: Settings) -> Request:
        if len(events) == 1:
            return self.build(events[0], settings)
        if not all(self.batchable(e) for e in events):
            raise ValueError("only identify and segment calls go in a bulk request")
        return Request("POST", "/analytics/identify", [self.build(e, settings).json for e in events])

    def classify_batch(self, status: int, headers: Mapping[str, str], body: str, request: Request,
                       n: int) -> list[Outcome]:
        outcome = self.classify(status, headers, request)
        if n == 1 or outcome.verdict is not Verdict.REJECTED:
            return [outcome] * n
        if status not in ITEM_STATUSES:
            return [outcome] * n
        errors = item_errors(body, n)
        if not errors:  # no usable per-item answer: every item goes again, and the batcher splits
            return [Outcome(Verdict.RESEND, status)] * n
        return [Outcome(Verdict.REJECTED, status, message=errors[i]) if i in errors else Outcome(Verdict.RESEND, status)
                for i in range(n)]


def item_errors(body: str, n: int) -> dict[int, str]:
    """``{index: message}`` from a bulk rejection's ``errors``; empty unless every entry is usable.

    >>> item_errors('{"errors": [{"index": 0, "message": "id is required"}]}', 2)
    {0: 'id is required'}
    >>> item_errors('{"message": "bad"}', 2)
    {}
    """
    try:
        errors = json.loads(body).get("errors")
    except (ValueError, AttributeError):
        return {}
    if not isinstance(errors, list):
        return {}
    found: dict[int, str] = {}
    for entry in errors:
        index = entry.get("index") if isinstance(entry, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            return {}
        message = entry.get("message")
        found[index] = message if isinstance(message, str) and message else "rejected"
    return found
