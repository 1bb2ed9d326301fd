"""Keeping each vendor under its rate limit, globally, without letting one vendor take over a worker.

    ratelimit -> the limiter: a window log per vendor in Redis, shared by every process
    adaptive  -> the effective rate follows the vendor's 429s and announced limits
    throttle  -> a delivery thread waiting for a token (a few per vendor, the rest requeue)
    gate      -> pause and resume consuming a vendor's queue inside a running worker
    bulkhead  -> one vendor's deliveries hold at most their share of a worker's threads

Example::

    >>> from worker.limits import Unlimited, Throttle
    >>> Throttle().wait("loops", Unlimited())   # returns at once: a token was free
"""

from .ratelimit import RateLimiter, Reservation, TokenBucket, Unlimited, WindowLimiter, limiter_for
from .throttle import Throttle, Throttled

__all__ = ["RateLimiter", "Reservation", "TokenBucket", "Unlimited", "WindowLimiter", "limiter_for", "Throttle",
           "Throttled"]
