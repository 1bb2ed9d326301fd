"""Base class for one fake vendor API, plus helpers for JSON error responses.

A vendor is a `VendorAPI` subclass that declares where it is mounted, which
credentials it checks and a table of routes.  The server takes care of
recording, latency, injected failures and rate limiting; a vendor only
answers "is this request authenticated?", "what is the response to this
(already authenticated) request?" and, for a request it accepted (2xx),
"what did it change, for whom?" (`VendorAPI.person_writes`: a list of
`PersonWrite`, folded into ``/_sandbox/state`` by `state.SandboxState`).

Example::

    class EchoAPI(VendorAPI):
        name = "echo"
        prefix = "/echo/v1"
        credential_defaults = {"ECHO_API_KEY": "sandbox-echo-key"}

        def check_auth(self, headers):
            return bearer_token(headers) == self.credentials["ECHO_API_KEY"]

        def routes(self):
            return {("POST", "/things"): self.create_thing}

        def create_thing(self, body):
            thing = expect_object(body)
            require(is_nonempty_str(thing.get("name")), "name is required")
            return ok(id="thing_1")

        def person_writes(self, method, path, body, idempotency_key):
            # /_sandbox/state -> {"echo": {NAME: {"fields": {"made": 1}, "members": [],
            #                                     "events": [{"created": NAME}], "writes": 1}}}
            return [(body["name"], [op_inc("made", 1), op_event({"created": body["name"]})])]
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

__all__ = [
    "Headers",
    "Op",
    "PersonWrite",
    "Response",
    "RouteHandler",
    "ValidationError",
    "VendorAPI",
    "basic_auth",
    "bearer_token",
    "error",
    "expect_object",
    "is_nonempty_str",
    "ok",
    "op_event",
    "op_inc",
    "op_member",
    "op_set",
    "require",
    "secret_equals",
]

#: Request headers as seen by vendors: lower-case names -> value.
Headers = Mapping[str, str]
#: (HTTP status, JSON-serialisable body).
Response = tuple[int, Any]
#: A route handler receives the parsed JSON body and returns a response.
RouteHandler = Callable[[Any], Response]
#: One change to one person's state, ``(kind, key, value)``; build them with `op_set`, `op_inc`,
#: `op_member` and `op_event`.
Op = tuple[str, Any, Any]
#: One accepted write to one person: (person key, its ops in the order they apply).
PersonWrite = tuple[str, list[Op]]


def op_set(key: str, value: Any) -> Op:
    """Set a field (attribute, property, trait): the last write wins."""
    return ("set", key, value)


def op_inc(key: str, amount: int | float) -> Op:
    """Add ``amount`` to a numeric field (a missing or non-numeric field counts as 0)."""
    return ("inc", key, amount)


def op_member(name: str, member: bool) -> Op:
    """Put the person in (True) or out of (False) ``name``: a segment, mailing list or tag."""
    return ("member", name, member)


def op_event(event: Any) -> Op:
    """Append ``event`` to the person's events."""
    return ("event", event, None)

# Status used for bodies that are not JSON or have the wrong top-level type.
BAD_REQUEST = 400
# Default status for domain validation failures (vendors may override).
UNPROCESSABLE = 422


class ValidationError(Exception):
    """Raised by route handlers to answer with an error response.

    ``status`` of None means "the vendor's `validation_status`".
    ``extra`` is merged into the JSON error body.
    """

    def __init__(self, message: str, status: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.extra = extra


def ok(**fields: Any) -> Response:
    """A 200 response ``{"success": true, **fields}``."""
    return 200, {"success": True, **fields}


def error(status: int, message: str, **extra: Any) -> Response:
    """An error response ``{"success": false, "message": message, **extra}``.

    >>> error(401, "Invalid API key")
    (401, {'success': False, 'message': 'Invalid API key'})
    """
    return status, {"success": False, "message": message, **extra}


def require(condition: object, message: str, status: int | None = None) -> None:
    """Raise `ValidationError` unless ``condition`` is truthy."""
    if not condition:
        raise ValidationError(message, status)


def is_nonempty_str(value: object) -> bool:
    """True for a string that is not empty or only whitespace."""
    return isinstance(value, str) and bool(value.strip())


def expect_object(body: Any, what: str = "request body") -> dict[str, Any]:
    """Return ``body`` if it is a JSON object, else raise a 400 `ValidationError`."""
    if not isinstance(body, dict):
        raise ValidationError(f"{what} must be a JSON object", BAD_REQUEST)
    return body


def secret_equals(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented secret with the expected one."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


def bearer_token(headers: Headers) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def basic_auth(headers: Headers) -> tuple[str, str] | None:
    """The (user, password) of an ``Authorization: Basic ...`` header, or None."""
    scheme, _, encoded = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class VendorAPI:
    """One fake vendor, mounted under `prefix` (e.g. ``/loops/api/v1``).

    Subclasses set `name`, `prefix`, `credential_defaults` and implement
    `check_auth` and `routes`.  `handle` does routing (404/405), JSON parsing
    (400) and turns `ValidationError` into error responses.
    """

    #: Vendor name used in the control API and in records, e.g. "loops".
    name: ClassVar[str]
    #: URL path prefix the vendor is mounted under, without trailing slash.
    prefix: ClassVar[str]
    #: Environment variable name -> default value of the credentials checked.
    credential_defaults: ClassVar[dict[str, str]] = {}
    #: Status for domain validation failures raised without an explicit status.
    validation_status: ClassVar[int] = UNPROCESSABLE
    #: (method, path) pairs honouring an ``Idempotency-Key`` header.
    idempotent_routes: ClassVar[frozenset[tuple[str, str]]] = frozenset()
    #: Answer ``x-ratelimit-limit`` / ``x-ratelimit-remaining`` while a rate limit is set (Loops does).
    rate_limit_headers: ClassVar[bool] = False
    #: Names of a person's three parts in ``/_sandbox/state``: its fields, its memberships, its events.
    state_parts: ClassVar[tuple[str, str, str]] = ("fields", "members", "events")
    #: Memberships shown as ``{name: true|false}`` (True) or as the sorted names the person is in (False).
    members_as_map: ClassVar[bool] = False

    def __init__(self, credentials: Mapping[str, str] | None = None) -> None:
        given = credentials or {}
        self.credentials: dict[str, str] = {
            key: given.get(key, default) for key, default in self.credential_defaults.items()
        }
        self._routes: dict[str, dict[str, RouteHandler]] = {}
        for (method, path), handler in self.routes().items():
            self._routes.setdefault(path, {})[method.upper()] = handler

    # -- to implement -----------------------------------------------------

    def check_auth(self, headers: Headers) -> bool:
        """True if ``headers`` (lower-case names) carry valid credentials."""
        raise NotImplementedError

    def routes(self) -> Mapping[tuple[str, str], RouteHandler]:
        """``{(method, path relative to prefix): handler}``."""
        raise NotImplementedError

    def person_writes(self, method: str, path: str, body: Any, idempotency_key: str | None) -> list[PersonWrite]:
        """What a request this vendor accepted (answered 2xx) changed, in the order it applies.

        ``path`` is relative to `prefix`, without a trailing slash; ``body`` is the parsed JSON
        (valid: the route accepted it).  Default: nothing (a vendor without person state).
        """
        return []

    # -- provided ---------------------------------------------------------

    def unauthorized(self) -> Response:
        """The 401 answer for missing/invalid credentials (never echoes them)."""
        return error(401, "Invalid or missing credentials")

    def idempotency_conflict(self) -> Response:
        """The answer for a reused ``Idempotency-Key``."""
        return error(409, "Idempotency key already used")

    def handle(self, method: str, path: str, headers: Headers, body: bytes) -> Response:
        """Answer an authenticated request for ``path`` (relative to `prefix`)."""
        by_method = self._routes.get(path.rstrip("/") or "/")
        if by_method is None:
            return error(404, f"No route for {path}")
        handler = by_method.get(method.upper())
        if handler is None:
            allowed = ", ".join(sorted(by_method))
            return error(405, f"Method {method} not allowed for {path}; use {allowed}")
        try:
            parsed = json.loads(body)
        except ValueError:
            return error(BAD_REQUEST, "Request body must be valid JSON")
        try:
            return handler(parsed)
        except ValidationError as exc:
            return error(exc.status or self.validation_status, exc.message, **exc.extra)
