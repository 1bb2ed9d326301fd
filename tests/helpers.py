"""Small measuring helpers shared by the tests and the benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

from worker.limits.ratelimit import RateLimiter, Reservation


def kombu_envelope(tag: str, queue: str = "q") -> dict:
    """A minimal kombu message envelope on ``queue`` with delivery tag ``tag``, as a worker takes one."""
    return {"body": "e30=", "content-type": "application/json", "content-encoding": "utf-8", "headers": {},
            "properties": {"delivery_tag": tag, "delivery_info": {"exchange": "", "routing_key": queue}}}


def run_python(code: str, env: dict[str, str] | None = None, cwd: str | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (a clean import state: monkey-patching, lazy imports) and return
    the JSON object it printed last; a failure shows its output."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    """A stored kombu message (or an unacked record holding one) with its body decoded (base64 or compact)."""
    import json

    from worker.envelope import decode_body

    text = item.decode(errors="replace")
    try:
        value = json.loads(text)
        envelope = value[0] if isinstance(value, list) else value
        return text + json.dumps(decode_body(envelope), ensure_ascii=False)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
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


def celery_reads(redis_url: str, raw: str | bytes, queue: str = "loops") -> dict:
    """What a stock Celery 5 worker reads from one queued message ``raw``: it is LPUSHed on ``queue``, taken by
    kombu's stock Redis transport (not this product's: any Celery worker), made a request by Celery's default
    strategy (``celery.worker.strategy``) for ``worker.deliver``, and its body decoded as ``celery.app.trace`` does
    before running the task (``fast_trace_task``: the body by its content type, then the embed into the request
    context). The message is acknowledged; the queue is left empty.

    Returns ``request`` (Celery's Request), ``context`` (the task's ``self.request``: a Context as the trace
    builds it), ``received`` (the task-received event Flower gets: name, args summary, retries, ...),
    ``args``/``kwargs``/``embed`` as the trace decodes them, and ``seen``: every field the worker, the task
    (``worker.broker.tasks``) and Flower read, in plain values, but the args summary (``argsrepr``).
    """
    from unittest import mock

    import redis
    from celery.app.task import Context, get_actual_ignore_result
    from celery.worker import strategy
    from kombu import Connection, Consumer, Queue
    from kombu.serialization import loads

    from worker.broker.tasks import deliver
    from worker.keys import HEADER
    from worker.retries.attempts import RetryState

    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(queue)
        client.lpush(queue, raw)
    finally:
        client.close()
    taken: list = []
    with Connection(redis_url, transport="redis") as connection:
        assert type(connection.transport).__module__ == "kombu.transport.redis", "not kombu's stock transport"
        with Consumer(connection, [Queue(queue, routing_key=queue)], on_message=taken.append, accept=["json"]):
            connection.drain_events(timeout=10)
        (message,) = taken
        consumer = mock.MagicMock(disable_rate_limits=True)
        consumer.controller.state.revoked = set()
        handle = strategy.default(deliver, deliver.app, consumer, task_reserved=lambda request: None)
        handle(message, None, message.ack, message.reject, set())
        ((request,), _) = consumer.on_task_request.call_args
        received = [c.kwargs for c in consumer.event_dispatcher.send.call_args_list if c.args == ("task-received",)]
        args, kwargs, embed = loads(request.body, request.content_type, request.content_encoding,
                                    accept={"application/json"})
        context = Context(dict(request.request_dict, args=args, kwargs=kwargs, **(embed or {})),
                          called_directly=False)
        message.ack()
    (event,) = received
    seen = {
        "name": request.name, "id": request.id, "args": args, "kwargs": kwargs,
        "retries": context.retries, "eta": request.eta, "expires": request.expires,
        "time_limits": tuple(request.time_limits), "root_id": context.root_id or context.id,  # as the trace does
        "parent_id": context.parent_id, "group": context.group, "group_index": context.group_index,
        "shadow": context.shadow, "callbacks": context.callbacks, "errbacks": context.errbacks,
        "chain": context.chain, "chord": context.chord, "replaced_task_nesting": context.replaced_task_nesting,
        "stamps": request.stamps, "exchange": request.delivery_info["exchange"],
        "routing_key": request.delivery_info["routing_key"], "redelivered": request.delivery_info["redelivered"],
        "ignore_result": get_actual_ignore_result(deliver, context),
        "retry_state": RetryState.from_headers(vars(context)), "person": vars(context).get(HEADER),
        "flower": {k: event[k] for k in ("uuid", "name", "retries", "eta", "expires")},
    }
    return {"request": request, "context": context, "received": event, "args": args, "kwargs": kwargs,
            "embed": embed, "seen": seen}


class ShutLimiter(RateLimiter):
    """No token until ``opened`` is set; then every acquire is granted at once. :meth:`sleep` (a
    :class:`~worker.limits.throttle.Throttle`'s) blocks until then, so its waiters wait on the test, not on a
    clock. ``asked`` records each (thread, as a waiter) that asked for a token."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.asked: set[tuple[int, bool]] = set()

    def acquire(self, max_wait: float = 0.0) -> Reservation:
        self.asked.add((threading.get_ident(), max_wait > 0))
        return Reservation(True, 0.0) if self.opened.is_set() else Reservation(False, 0.01)

    def sleep(self, seconds: float) -> None:
        self.opened.wait()
