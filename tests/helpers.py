"""Small measuring helpers shared by the tests and the benchmarks."""

from __future__ import annotations


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most timestamps that fall within any ``window`` seconds.

    >>> max_in_window([0.0, 0.5, 0.99, 1.5])
    3
    """
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def email_of(vendor: str, body: dict) -> str | None:
    """The person's email (ConveYour: the contact id) in a request the sandbox recorded for ``vendor``."""
    if vendor == "convertloop":
        return body.get("person", {}).get("email")
    if vendor == "conveyour":
        return body.get("id")
    return body.get("email")
