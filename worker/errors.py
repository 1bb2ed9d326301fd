"""The exceptions callers and operators see, and the reasons a delivery is dead-lettered.

    WorkerError
    ├── InvalidEvent (ValueError)        a producer call was malformed; nothing enqueued
    ├── EnqueueError (RuntimeError)      neither Redis nor the spool took the event
    ├── ConfigurationError (RuntimeError) no vendor can be delivered to
    └── DeadLettered                     a delivery failed for good (a task's FAILURE in Flower)

Example::

    >>> import worker
    >>> try:
    ...     worker.track("", email="jill@acme.co")
    ... except worker.InvalidEvent as exc:
    ...     print(exc)
    event name must be a non-empty string
"""

from __future__ import annotations


class WorkerError(Exception):
    """Every exception of this package a caller may catch."""


class InvalidEvent(WorkerError, ValueError):
    """A producer call was malformed; nothing was enqueued."""


class EnqueueError(WorkerError, RuntimeError):
    """Neither the broker nor the local spool could take the event; nothing was enqueued."""


class ConfigurationError(WorkerError, RuntimeError):
    """The product is not configured to deliver anywhere (no vendor credentials); nothing was enqueued."""


class DeadLettered(WorkerError):
    """A delivery failed for good and was stored as a dead letter.

    It is the exception a delivery task ends with, so Flower shows it as
    FAILURE and Sentry reports it once.
    """

    def __init__(self, vendor: str, status: int | None, reason: str, entry_id: str, detail: str = "") -> None:
        self.vendor = vendor
        self.status = status
        self.reason = reason
        self.entry_id = entry_id
        #: Why, on one line (the vendor's own message, credentials filtered, cut short), as Flower shows it.
        self.detail = detail
        super().__init__(
            f"{vendor}: status={status if status is not None else '-'} "
            f"reason={reason} dead_letter={entry_id}" + (f": {detail}" if detail else "")
        )

    def __reduce__(self):  # keep it picklable with its arguments
        return (type(self), (self.vendor, self.status, self.reason, self.entry_id, self.detail))


# Reasons a delivery is dead-lettered (DeadLettered.reason).
REJECTED = "rejected"  # the vendor answered a permanent 4xx
RETRIES_EXHAUSTED = "retries_exhausted"  # transient failures for RETRY_WINDOW (or RETRY_MAX_ATTEMPTS attempts)
PROPERTY_CAP = "property_cap"  # more than EVENT_PROPERTY_CAP properties; never sent
MALFORMED = "malformed"  # the queue message was not a valid delivery
VENDOR_DISABLED = "vendor_disabled"  # the vendor's credentials are not set on this worker
REQUEST_ERROR = "request_error"  # the request could not be made (e.g. a bad base URL)
CONFIGURATION = "configuration"  # this worker's settings cannot carry it (e.g. no LOOPS_MAILING_LISTS entry)
#: Every reason, in the order operators read them (metrics label values).
REASONS = (REJECTED, RETRIES_EXHAUSTED, PROPERTY_CAP, MALFORMED, VENDOR_DISABLED, REQUEST_ERROR, CONFIGURATION)
