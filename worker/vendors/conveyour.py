"""ConveYour: the analytics identify and track calls; segments are ``tags``.

Document: ``shared/vendor-docs/conveyour-api.txt``. Headers
``x-conveyour-appkey`` and ``x-conveyour-token``. The contact id is the
user_id when given, else the email.

Example::

    >>> from worker.events import SegmentEvent, Identity
    >>> e = SegmentEvent(id="e1", created_at="2026-01-01T00:00:00Z", identity=Identity(user_id="42"),
    ...                  add=["vip"], remove=["trial"])
    >>> ConveYour().build(e, None).json
    {'id': '42', 'traits': {'tags': {'add': ['vip'], 'remove': ['trial']}}}
"""

from __future__ import annotations

from ..settings import Settings
from .base import AnyEvent, Request, Vendor


def contact_id(event: AnyEvent) -> str | None:
    return event.identity.user_id or event.identity.email


class ConveYour(Vendor):
    name = "conveyour"
    credential_env = "CONVEYOUR_APPKEY, CONVEYOUR_TOKEN and CONVEYOUR_BASE_URL"

    def enabled(self, settings: Settings) -> bool:
        return bool(settings.conveyour_appkey and settings.conveyour_token and settings.conveyour_base_url)

    def base_url(self, settings: Settings) -> str:
        return settings.conveyour_base_url or ""

    def auth_headers(self, settings: Settings) -> dict[str, str]:
        return {
            "x-conveyour-appkey": settings.conveyour_appkey.get_secret_value(),
            "x-conveyour-token": settings.conveyour_token.get_secret_value(),
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
        return Request("POST", "/analytics/identify", {"id": cid, "traits": {"tags": tags}})
