"""How long to wait before the next attempt: exponential backoff with full jitter.

A vendor's ``Retry-After`` wins over the computed backoff (capped, like
everything, at ``RETRY_BACKOFF_MAX`` so a waiting retry never outlives the
broker's visibility timeout).

Example::

    >>> import random
    >>> 0 <= full_jitter(attempt=3, base=2.0, cap=600.0, rng=random.Random(1)) <= 8.0
    True
"""

from __future__ import annotations

import random

#: Extra wait on top of a vendor's Retry-After, as a fraction of it, so that
#: workers told the same Retry-After do not all return at the same instant.
RETRY_AFTER_SPREAD = 0.1
#: The most that spread adds, in seconds.
RETRY_AFTER_SPREAD_MAX = 1.0


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """A uniform wait in ``[0, min(cap, base * 2**(attempt-1))]`` after failed attempt ``attempt`` (1-based)."""
    ceiling = min(cap, base * 2 ** max(0, min(attempt - 1, 62)))
    return (rng or random).uniform(0, ceiling)


def countdown(attempt: int, retry_after: float | None, base: float, cap: float,
              rng: random.Random | None = None) -> float:
    """Seconds until the next attempt: ``Retry-After`` (plus a little spread) when given, else full jitter."""
    if retry_after is not None:
        spread = (rng or random).uniform(0, min(RETRY_AFTER_SPREAD_MAX, RETRY_AFTER_SPREAD * retry_after))
        return min(cap, retry_after + spread)
    return full_jitter(attempt, base, cap, rng)
