"""Remove credential strings from anything that leaves the process.

Example::

    >>> scrub("key=abc123 ok", ["abc123"])
    'key=[Filtered] ok'
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

#: What a credential is replaced with.
FILTERED = "[Filtered]"


def scrub(text: str, secrets: list[str]) -> str:
    r"""``text`` with each secret replaced, also as an error message may quote it (escaped: ``repr`` of the
    string or of its bytes, then perhaps JSON) -- a key pasted with its newline is quoted ``b'key\n'`` by the
    HTTP client that refuses to send it.

    >>> scrub("Illegal header value b'abc123\\n'", ["abc123\n"])
    "Illegal header value b'[Filtered]'"
    """
    for secret in secrets:
        for form in _forms(secret):
            if form in text:
                text = text.replace(form, FILTERED)
    return text


#: Characters an error message escapes when it quotes a value (controls and whitespace).
_UNPRINTABLE = re.compile(r"[\x00-\x20\x7f]+")
#: The shortest run of a secret's printable characters that is filtered on its own.
MIN_RUN = 6


@lru_cache(maxsize=64)
def _forms(secret: str) -> tuple[str, ...]:
    """The ways ``secret`` may appear in a text, longest first: as it is, escaped, and -- when it holds whitespace or
    control characters, which every quoting escapes its own way -- each run of its other characters."""
    forms = {secret, repr(secret)[1:-1], repr(secret.encode())[2:-1]}
    runs = [run for run in _UNPRINTABLE.split(secret) if run != secret]
    forms.update(run for run in runs if len(run) >= MIN_RUN)
    return tuple(sorted((f for f in forms if f), key=len, reverse=True))


def scrub_obj(obj: Any, secrets: list[str]) -> Any:
    """The same for nested dicts / lists / strings (e.g. a Sentry event)."""
    if isinstance(obj, str):
        return scrub(obj, secrets)
    if isinstance(obj, dict):
        return {scrub_obj(k, secrets): scrub_obj(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_obj(v, secrets) for v in obj)
    return obj
