"""Remove credential strings from anything that leaves the process.

Example::

    >>> scrub("key=abc123 ok", ["abc123"])
    'key=[Filtered] ok'
"""

from __future__ import annotations

from typing import Any

#: What a credential is replaced with.
FILTERED = "[Filtered]"


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, FILTERED)
    return text


def scrub_obj(obj: Any, secrets: list[str]) -> Any:
    """The same for nested dicts / lists / strings (e.g. a Sentry event)."""
    if isinstance(obj, str):
        return scrub(obj, secrets)
    if isinstance(obj, dict):
        return {scrub_obj(k, secrets): scrub_obj(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_obj(v, secrets) for v in obj)
    return obj
