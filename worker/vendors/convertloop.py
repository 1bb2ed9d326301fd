"""ConvertLoop: ``/people`` for identify and segments, ``/event_logs`` for events.

Document: ``shared/vendor-docs/convertloop-api.txt``. Basic auth ``app_id:api_key``.

Example::

    >>> from worker.events import TrackEvent, Identity
    >>> e = TrackEvent(id="e1", created_at="2026-01-01T00:00:00Z", identity=Identity(email="j@a.co"),
    ...                event="made_sale", properties={"amount": 1000})
    >>> ConvertLoop().build(e, None).json  # doctest: +NORMALIZE_WHITESPACE
    {'name': 'made_sale', 'person': {'email': 'j@a.co'}, 'metadata': {'amount': 1000},
     'ocurred_at': '2026-01-01T00:00:00Z'}
"""

from __future__ import annotations

import base64
from typing import ClassVar

from ..settings import Settings
from .base import AnyEvent, Request, Vendor, secret

#: The key ConvertLoop's own client libraries send for an event's time (sic).
OCCURRED_AT_KEY = "ocurred_at"


class ConvertLoop(Vendor):
    name = "convertloop"
    credential_env = "CONVERTLOOP_APP_ID and CONVERTLOOP_API_KEY"
    reserved_traits: ClassVar[frozenset[str]] = frozenset(
        {"pid", "user_id", "email", "add_to_segments", "remove_from_segments"})

    def enabled(self, settings: Settings) -> bool:
        return bool(settings.convertloop_app_id and settings.convertloop_api_key)

    def base_url(self, settings: Settings) -> str:
        return settings.convertloop_base_url

    def auth_headers(self, settings: Settings) -> dict[str, str]:
        pair = f"{secret(settings.convertloop_app_id)}:{secret(settings.convertloop_api_key)}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}

    def build(self, event: AnyEvent, settings: Settings) -> Request:
        identity = event.identity.as_dict()
        if event.operation == "identify":
            return Request("POST", "/people", {**event.traits, **identity})
        if event.operation == "track":
            # The event's own time, else when the producer made the call: a retried event lands at its time.
            body = {"name": event.event, "person": identity, "metadata": dict(event.properties),
                    OCCURRED_AT_KEY: event.occurred_at or event.created_at}
            return Request("POST", "/event_logs", body)
        if event.operation == "update":
            segments = {"add_to_segments": list(event.add), "remove_from_segments": list(event.remove)}
            return Request("POST", "/people", {**event.traits, **identity, **{k: v for k, v in segments.items() if v}})
        return Request(
            "POST",
            "/people",
            {**identity, "add_to_segments": list(event.add), "remove_from_segments": list(event.remove)},
        )
