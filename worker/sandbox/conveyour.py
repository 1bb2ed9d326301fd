"""Fake ConveYour analytics API (``https://SUBDOMAIN.conveyour.com/api``).

Auth is the pair of headers ``x-conveyour-appkey`` / ``x-conveyour-token``.
Endpoints:

- ``POST /analytics/identify`` -- one contact object, or an array (bulk).
- ``POST /analytics/track`` -- events for one contact; event objects with
  more than `MAX_EVENT_PROPERTIES` properties are rejected.

Example::

    httpx.post(f"{base}/analytics/identify",
               headers={"x-conveyour-appkey": "sandbox-appkey",
                        "x-conveyour-token": "sandbox-conveyour-token"},
               json=[{"id": "u1", "traits": {"plan": "pro", "logins": {"$inc": 1}, "tags": {"add": ["vip"]}}}])
    # -> 200 {"success": true, "count": 1}
    # GET /_sandbox/state?vendor=conveyour -> {"conveyour": {"u1": {"traits": {"plan": "pro", "logins": 1},
    #     "tags": ["vip"], "events": [], "writes": 1}}}

State (``/_sandbox/state``), per contact keyed by ``id``:

- ``traits``: the last value per trait, but ``{"$inc": n}`` (a number) adds n to the
  trait (from 0 if it is missing or not a number) and ``tags`` changes ``tags``;
- ``tags``: ``traits.tags.add`` applied, then ``traits.tags.remove``;
- ``events``: ``{"event", "properties"}`` per item of a track call's ``events``.

A bulk identify applies its items in array order, each a write of its contact.
"""

from __future__ import annotations

from typing import Any

from .base import (
    Headers,
    Op,
    PersonWrite,
    Response,
    RouteHandler,
    ValidationError,
    VendorAPI,
    error,
    is_nonempty_str,
    ok,
    op_event,
    op_inc,
    op_member,
    op_set,
    require,
    secret_equals,
)

__all__ = ["MAX_EVENT_PROPERTIES", "ConveYourAPI"]

# ConveYour blocks event objects with more key/value pairs than this.
MAX_EVENT_PROPERTIES = 15
# The vendor's wording for events over the property limit.
TOO_MANY_PROPERTIES = (
    f"We block storing event objects with more than {MAX_EVENT_PROPERTIES} key/value pairs"
)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def validate_identify(item: object) -> None:
    """Validate one identify object (raises `ValidationError`)."""
    if not isinstance(item, dict):
        raise ValidationError("identify item must be an object")
    require(is_nonempty_str(item.get("id")), "id is required (non-empty string)")
    if "traits" not in item:
        return
    traits = item["traits"]
    require(isinstance(traits, dict), "traits must be an object")
    if "tags" in traits:
        tags = traits["tags"]
        require(isinstance(tags, dict), "traits.tags must be an object with add/remove lists")
        for op in ("add", "remove"):
            if op in tags:
                require(_is_str_list(tags[op]), f"traits.tags.{op} must be a list of strings")


def increment(value: object) -> int | float | None:
    """n of a ``{"$inc": n}`` trait value (n a number), else None."""
    if isinstance(value, dict) and len(value) == 1 and "$inc" in value:
        amount = value["$inc"]
        if isinstance(amount, (int, float)) and not isinstance(amount, bool):
            return amount
    return None


def trait_ops(traits: dict[str, Any]) -> list[Op]:
    """Per trait in order: tags added then removed, an increment, or the value set."""
    ops: list[Op] = []
    for key, value in traits.items():
        amount = increment(value)
        if key == "tags" and isinstance(value, dict):
            ops += [op_member(tag, True) for tag in value.get("add", [])]
            ops += [op_member(tag, False) for tag in value.get("remove", [])]
        elif amount is not None:
            ops.append(op_inc(key, amount))
        else:
            ops.append(op_set(key, value))
    return ops


class ConveYourAPI(VendorAPI):
    """ConveYour: appkey/token headers, 422 on validation failures, bulk identify."""

    name = "conveyour"
    prefix = "/conveyour/api"
    credential_defaults = {
        "CONVEYOUR_APPKEY": "sandbox-appkey",
        "CONVEYOUR_TOKEN": "sandbox-conveyour-token",
    }
    state_parts = ("traits", "tags", "events")

    def check_auth(self, headers: Headers) -> bool:
        appkey_ok = secret_equals(headers.get("x-conveyour-appkey"), self.credentials["CONVEYOUR_APPKEY"])
        token_ok = secret_equals(headers.get("x-conveyour-token"), self.credentials["CONVEYOUR_TOKEN"])
        return appkey_ok and token_ok

    def routes(self) -> dict[tuple[str, str], RouteHandler]:
        return {
            ("POST", "/analytics/identify"): self.identify,
            ("POST", "/analytics/track"): self.track,
        }

    def identify(self, body: Any) -> Response:
        if isinstance(body, dict):
            validate_identify(body)
            return ok()
        if not isinstance(body, list):
            raise ValidationError("request body must be an object or an array of objects", 400)
        errors = []
        for index, item in enumerate(body):
            try:
                validate_identify(item)
            except ValidationError as exc:
                errors.append({"index": index, "message": exc.message})
        if errors:
            return error(422, f"{len(errors)} of {len(body)} items are invalid", errors=errors)
        return ok(count=len(body))

    def track(self, body: Any) -> Response:
        if not isinstance(body, dict):
            raise ValidationError("request body must be a JSON object", 400)
        require(is_nonempty_str(body.get("id")), "id is required (non-empty string)")
        events = body.get("events")
        if not isinstance(events, list) or not events:
            raise ValidationError("events must be a non-empty list")
        for index, event in enumerate(events):
            require(isinstance(event, dict), f"events[{index}] must be an object")
            require(is_nonempty_str(event.get("event")), f"events[{index}].event is required")
            if "properties" in event:
                props = event["properties"]
                require(isinstance(props, dict), f"events[{index}].properties must be an object")
                require(len(props) <= MAX_EVENT_PROPERTIES, TOO_MANY_PROPERTIES)
        return ok()

    def person_writes(self, method: str, path: str, body: Any, idempotency_key: str | None) -> list[PersonWrite]:
        if path == "/analytics/identify":
            items = body if isinstance(body, list) else [body]
            return [(item["id"], trait_ops(item.get("traits", {}))) for item in items]
        events = [op_event({"event": e["event"], "properties": e.get("properties", {})}) for e in body["events"]]
        return [(body["id"], events)]
