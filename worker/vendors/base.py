"""The small contract every vendor module fulfils: build requests, classify responses.

A vendor module is pure: no I/O, no Celery, no Redis. The delivery pipeline
(:mod:`worker.delivery.pipeline`) does the sending. Credentials only ever appear in
:meth:`Vendor.auth_headers`, which the pipeline adds at send time, so built
requests can be logged and dead-lettered safely.

A vendor that accepts several calls in one request (ConveYour's bulk identify)
also says which events may share a request (:meth:`Vendor.batchable`), builds
that request (:meth:`Vendor.build_batch`) and maps its answer onto one
:class:`Outcome` per event (:meth:`Vendor.classify_batch`); the defaults mean
"no batching". :mod:`worker.delivery.batching` does the gathering.

Example::

    >>> from worker.vendors import VENDORS
    >>> VENDORS["loops"].classify(409, {}, Request("POST", "/events/send", {}, {"Idempotency-Key": "e1"})).verdict
    <Verdict.DELIVERED: 'delivered'>
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

from pydantic import SecretStr

from ..events import IdentifyEvent, SegmentEvent, TrackEvent, UpdateEvent
from ..settings import Settings

#: An event a vendor builds a request for: a call, or several identify/segment calls merged into an update.
AnyEvent = IdentifyEvent | TrackEvent | SegmentEvent | UpdateEvent


def secret(value: SecretStr | None) -> str:
    """A credential's value for :meth:`Vendor.auth_headers`; "" if unset (the pipeline never sends to a vendor
    that is not enabled, i.e. whose credentials are unset)."""
    return value.get_secret_value() if value is not None else ""


@dataclass(frozen=True)
class Request:
    """One HTTP request to a vendor, relative to its base URL, without credentials."""

    method: str
    path: str
    json: Any
    headers: Mapping[str, str] = field(default_factory=dict)


class Verdict(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"
    #: Bulk requests only: the vendor refused the request for other items (or did
    #: not say which); this one was not stored and must be sent again.
    RESEND = "resend"


@dataclass(frozen=True)
class Outcome:
    """What a response means for the delivery."""

    verdict: Verdict
    status: int | None
    #: Seconds the vendor asked us to wait (``Retry-After``), if it did.
    retry_after: float | None = None
    #: What the vendor said about this item of a bulk request, if anything.
    message: str | None = None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` value: delta-seconds or an HTTP date.

    >>> parse_retry_after("3")
    3.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=datetime(2015, 10, 21, 7, 27, 58, tzinfo=UTC))
    2.0
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class Vendor:
    """Base class: one instance per vendor, registered in :data:`worker.vendors.VENDORS`."""

    #: The vendor's name, also the name of its Celery queue.
    name: ClassVar[str]
    #: The env variables that enable it, for error messages.
    credential_env: ClassVar[str]

    def enabled(self, settings: Settings) -> bool:
        raise NotImplementedError

    def base_url(self, settings: Settings) -> str:
        raise NotImplementedError

    def rate_limit(self, settings: Settings) -> float:
        """Requests per second across all workers; 0 means unlimited."""
        return float(getattr(settings, f"{self.name}_rate_limit"))

    def auth_headers(self, settings: Settings) -> dict[str, str]:
        raise NotImplementedError

    def refusal(self, event: AnyEvent, settings: Settings) -> str | None:
        """Why this vendor cannot carry ``event``, or None when it can."""
        return None

    # -- per-person order -------------------------------------------------------

    #: Trait keys that would clash with what a merged update adds (identity, segment keys): an identify
    #: setting one of them is sent on its own, never merged.
    reserved_traits: ClassVar[frozenset[str]] = frozenset()

    def person_key(self, identity: Mapping[str, Any]) -> str | None:
        """Who a call is about, as this vendor identifies people (the key its calls are ordered by), from the
        event's identity keys; None when the vendor cannot carry the call. The default: email, else user_id,
        else pid.

        >>> Vendor().person_key({"email": "j@a.co", "user_id": "42"})
        'email:j@a.co'
        """
        for key in ("email", "user_id", "pid"):
            if identity.get(key):
                return f"{key}:{identity[key]}"
        return None

    def mergeable(self, event: AnyEvent) -> bool:
        """May ``event`` be merged with the identify/segment calls next to it into one update request?"""
        if event.operation == "segment":
            return True
        return event.operation == "identify" and not (self.reserved_traits & event.traits.keys())

    def build(self, event: AnyEvent, settings: Settings) -> Request:
        raise NotImplementedError

    def classify(self, status: int, headers: Mapping[str, str], request: Request) -> Outcome:
        """2xx delivered; 429, 408 and 5xx retried (with Retry-After); any other status rejected."""
        if 200 <= status < 300:
            return Outcome(Verdict.DELIVERED, status)
        if status in (408, 429) or status >= 500:
            return Outcome(Verdict.RETRY, status, parse_retry_after(headers.get("retry-after")))
        return Outcome(Verdict.REJECTED, status)

    # -- bulk requests (the defaults: every event goes alone) ------------------

    def batch_size(self, settings: Settings) -> int:
        """Most events in one request; 1 means no batching."""
        return 1

    def batch_max_wait(self, settings: Settings) -> float:
        """Seconds a batch waits for more events after its first one."""
        return 0.0

    def batchable(self, event: AnyEvent) -> bool:
        """Whether ``event`` may share a request with other batchable events."""
        return False

    def build_batch(self, events: Sequence[AnyEvent], settings: Settings) -> Request:
        """One request carrying ``events``; a single event goes out as :meth:`build` makes it."""
        if len(events) != 1:
            raise NotImplementedError(f"{self.name} has no bulk request")
        return self.build(events[0], settings)

    def classify_batch(self, status: int, headers: Mapping[str, str], body: str, request: Request,
                       n: int) -> list[Outcome]:
        """One outcome per event of a request built by :meth:`build_batch` from ``n`` events.

        ``body`` is the response text. Besides the usual verdicts an item may be
        :attr:`Verdict.RESEND`: not stored, send it again (alone if nothing else is known).
        """
        if n != 1:
            raise NotImplementedError(f"{self.name} has no bulk request")
        return [self.classify(status, headers, request)]
