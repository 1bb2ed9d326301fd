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


#: The vendor queues, and the hash where kombu's Redis transport keeps what a worker holds until it acks.
QUEUES = ("convertloop", "loops", "conveyour")
UNACKED = "unacked"


def wait_idle(redis_url: str, timeout: float = 30.0, queues: tuple[str, ...] = QUEUES) -> None:
    """Wait until the workers have nothing left: every queue empty and no delivery held unacked.

    The positive signal to wait for before asserting that something did *not* happen
    (no second request, no delivery to another vendor): a message is acked only after its
    delivery ended, a retry waiting for its countdown stays unacked, and kombu records a
    message as unacked before it takes the next one off a queue. Only deliveries count
    (``worker.deliver`` messages): Flower's control replies can stay in the same hash.
    Raises AssertionError on timeout.
    """
    import redis

    from worker.dev.localstack import wait_until

    client = redis.Redis.from_url(redis_url)
    try:
        def idle() -> bool:
            pipe = client.pipeline(transaction=False)
            for q in queues:
                pipe.llen(q)
            pipe.hvals(UNACKED)
            *lengths, held = pipe.execute()
            return not any(lengths) and not any(b"worker.deliver" in message for message in held)

        wait_until(idle, timeout=timeout, interval=0.05, message="the workers to finish every message")
    finally:
        client.close()


def stop_workers(workers: list, timeout: float = 20.0) -> None:
    """Stop worker processes (``WorkerProcess``) together: SIGTERM to each running one, then wait for each
    (SIGKILL to its process group after ``timeout``), then close their logs. Stopping one after the other
    would cost one warm shutdown per worker."""
    import os
    import signal
    import subprocess

    running = [w for w in workers if w.proc is not None and w.proc.poll() is None]
    for w in running:
        w.proc.send_signal(signal.SIGTERM)
    for w in running:
        try:
            w.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(w.proc.pid, signal.SIGKILL)
            w.proc.wait(5)
    for w in workers:
        w.stop()  # the process has ended: this closes its log


def breaker_open(vendor: str) -> bool:
    """Is ``vendor``'s circuit breaker open now, as every worker sees it (the test Redis, KEY_PREFIX vdw)?"""
    import os

    import redis

    from worker.retries.breaker import Breaker

    return Breaker(redis.Redis.from_url(os.environ["REDIS_URL"]), "vdw", threshold=1).poll(vendor).open


def locate(redis_url: str, needles: set[str], prefix: str = "vdw") -> dict[str, list[str]]:
    """Where in Redis messages mentioning each needle (an email, an event id) are: a vendor queue, kombu's
    ``unacked`` hash or a retry schedule; needles found nowhere are under ``"nowhere"``. For failure messages:
    it tells a lost message from one that is only waiting."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        places: dict[str, list[bytes]] = {q: client.lrange(q, 0, -1) for q in QUEUES}
        places[UNACKED] = list(client.hvals(UNACKED))
        for q in QUEUES:
            places[f"{prefix}:retries:{q}"] = client.zrange(f"{prefix}:retries:{q}", 0, -1)
    finally:
        client.close()
    texts = {name: [_readable(item) for item in items] for name, items in places.items()}
    found: dict[str, list[str]] = {}
    for needle in sorted(needles):
        where = [name for name, items in texts.items() if any(needle in text for text in items)]
        for name in where or ["nowhere"]:
            found.setdefault(name, []).append(needle)
    return found


def _readable(item: bytes) -> str:
    """A stored kombu message (or an unacked record holding one) with its base64 body decoded."""
    import base64
    import json

    text = item.decode(errors="replace")
    try:
        value = json.loads(text)
        envelope = value[0] if isinstance(value, list) else value
        return text + base64.b64decode(envelope["body"]).decode(errors="replace")
    except (ValueError, KeyError, TypeError, IndexError):
        return text


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A Prometheus scrape as ``{(sample name, sorted labels): value}``, parsed by prometheus_client.

    >>> metric_values('vdw_up{vendor="loops"} 1.0\\n')
    {('vdw_up', (('vendor', 'loops'),)): 1.0}
    """
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(values: dict, name: str, **labels: str) -> float | None:
    """One sample of :func:`metric_values` (None if the scrape did not have it)."""
    return values.get((name, tuple(sorted(labels.items()))))
