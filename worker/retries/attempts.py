"""What a delivery carries from one attempt to the next: its failed attempts and when failing began.

It travels in the retry message's headers (``vdw_retry``: ``[attempts, first_failure]``), next to Celery's
own ``retries`` count (every re-run, 429s included, as Flower shows it). Only
failures that count are in ``attempts``: a 429 or a throttled wait never uses
up the retry budget, and the retry window starts at the first counted failure.
Messages written before compact messages carry it as ``{"attempts": .., "first_failure": ..}``: read alike.

Example::

    >>> s = RetryState.from_headers({"vdw_retry": [2, 1700000000.0]})
    >>> s.next_attempt, s.first_failure
    (3, 1700000000.0)
    >>> RetryState.from_headers({"vdw_retry": {"attempts": 2, "first_failure": 1700000000.0}}) == s
    True
    >>> RetryState.from_headers(None).next_attempt
    1
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: The message header that carries a :class:`RetryState`.
HEADER = "vdw_retry"


@dataclass(frozen=True)
class RetryState:
    #: Failed attempts so far that count against RETRY_MAX_ATTEMPTS (429s do not).
    attempts: int = 0
    #: Unix time of the first counted failure: RETRY_WINDOW runs from here. None: none yet.
    first_failure: float | None = None

    @property
    def next_attempt(self) -> int:
        return self.attempts + 1

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None) -> RetryState:
        """The state in a message's headers; a fresh one for a first delivery or an unreadable header."""
        raw = (headers or {}).get(HEADER)
        if isinstance(raw, Mapping):  # as written before compact messages
            attempts, first = raw.get("attempts"), raw.get("first_failure")
        elif isinstance(raw, Sequence) and not isinstance(raw, str) and len(raw) == 2:
            attempts, first = raw
        else:
            return cls()
        return cls(attempts if isinstance(attempts, int) and attempts >= 0 else 0,
                   float(first) if isinstance(first, (int, float)) and not isinstance(first, bool) else None)

    def header(self) -> dict[str, Any]:
        """The header a message carries: ``{"vdw_retry": [attempts, first_failure]}``."""
        return {HEADER: [self.attempts, self.first_failure]}
