"""The vendor registry. Adding a vendor: one module here, one in ``worker/sandbox``, and their tests.

Example::

    >>> sorted(VENDORS)
    ['convertloop', 'conveyour', 'loops']
"""

from __future__ import annotations

from .base import Outcome, Request, Vendor, Verdict, parse_retry_after
from .convertloop import ConvertLoop
from .conveyour import ConveYour
from .loops import Loops

VENDORS: dict[str, Vendor] = {v.name: v for v in (ConvertLoop(), Loops(), ConveYour())}

__all__ = ["VENDORS", "Outcome", "Request", "Vendor", "Verdict", "parse_retry_after"]
