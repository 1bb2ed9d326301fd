"""The exceptions callers and operators see.

Example::

    >>> import worker
    >>> try:
    ...     worker.track("", email="jill@acme.co")
    ... except worker.InvalidEvent as exc:
    ...     print(exc)
    event name must be a non-empty string
"""

from __future__ import annotations


class InvalidEvent(ValueError):
    """A producer call was malformed; nothing was enqueued."""


class EnqueueError(RuntimeError):
    """Neither the broker nor the local spool could take the event; nothing was enqueued."""


class ConfigurationError(RuntimeError):
    """The product is not configured to deliver anywhere (no vendor credentials); nothing was enqueued."""


class DeadLettered(Exception):
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
