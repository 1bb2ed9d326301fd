"""What the metrics are called, which label values they take, and how their counts are kept in Redis.

Workers add to the counts (:mod:`worker.metrics.collect`), the exporter reads
them (:mod:`worker.ops.export`); both go through this module, so the two
sides cannot disagree. Counts live in ONE Redis hash, ``<KEY_PREFIX>:metrics:counters``,
one field per series:

- ``deliveries|<vendor>|<outcome>``, ``dead_letters|<vendor>|<reason>``,
  ``rate_limited|<vendor>``: counters;
- ``request_duration|<vendor>|le|<bound>`` (observations in that bucket alone,
  not cumulative; their total is the count) and ``request_duration|<vendor>|sum``: the histogram.

Label values are only ever a known vendor, outcome or reason (anything else
becomes ``unknown``): never event data, never a credential.

Example::

    >>> field(DELIVERIES, "loops", DELIVERED)
    'deliveries|loops|delivered'
    >>> vendor_label("not-a-vendor"), reason_label("rejected")
    ('unknown', 'rejected')
    >>> bucket_of(0.03)
    '0.05'
"""

from __future__ import annotations

import bisect
from typing import Final

from prometheus_client.utils import floatToGoString

from ..errors import REASONS
from ..vendors import VENDORS

#: Prefix of every metric name.
NAMESPACE: Final = "vdw"

# Outcomes of one delivery attempt (the ``outcome`` label of vdw_deliveries_total).
DELIVERED: Final = "delivered"
RETRIED: Final = "retried"
DEAD_LETTERED: Final = "dead_lettered"
#: Delivered inside another call's request (a person's waiting updates merged: worker/delivery/ordering.py); a merged
#: request of k calls counts 1 delivered and k - 1 merged.
MERGED: Final = "merged"
OUTCOMES: Final = (DELIVERED, RETRIED, DEAD_LETTERED, MERGED)

#: The label value of a vendor or reason this version does not know.
UNKNOWN: Final = "unknown"

# Families kept in Redis (the middle of each field name).
DELIVERIES: Final = "deliveries"
DEAD_LETTERS: Final = "dead_letters"
RATE_LIMITED: Final = "rate_limited"
REQUEST_DURATION: Final = "request_duration"

#: Upper bounds of the request-duration buckets, in seconds (prometheus_client's defaults: HTTP_TIMEOUT is 10 s).
BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, float("inf"))
#: The same bounds as Prometheus writes them in ``le`` labels ("0.005", ..., "+Inf").
BUCKET_LABELS: Final = tuple(floatToGoString(b) for b in BUCKETS)

SEP: Final = "|"


def counters_key(prefix: str) -> str:
    """The Redis hash that holds every count."""
    return f"{prefix}:metrics:counters"


def field(*parts: str) -> str:
    return SEP.join(parts)


def vendor_label(vendor: object) -> str:
    return vendor if isinstance(vendor, str) and vendor in VENDORS else UNKNOWN


def reason_label(reason: object) -> str:
    return reason if isinstance(reason, str) and reason in REASONS else UNKNOWN


def bucket_of(seconds: float) -> str:
    """The ``le`` label of the one bucket ``seconds`` falls in (the smallest bound >= it)."""
    return BUCKET_LABELS[min(bisect.bisect_left(BUCKETS, seconds), len(BUCKETS) - 1)]
