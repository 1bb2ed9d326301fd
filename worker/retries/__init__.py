"""What happens to a delivery that must be tried again, and to a vendor that is down.

    schedule  -> retries wait in Redis: a sorted set per vendor, scheduled and acknowledged in one script
    ticker    -> a thread per worker process: due retries back onto their queues, breakers followed
    breaker   -> a circuit breaker per vendor, shared by every worker; probes while open
    probe     -> one probe delivery of an open vendor, outside Celery's consumer
    attempts  -> what a retry message carries: failed attempts so far, when failing began
    backoff   -> how long to wait: exponential backoff with full jitter, Retry-After honoured

Example::

    >>> from worker.retries.attempts import RetryState
    >>> RetryState().next_attempt
    1
"""
