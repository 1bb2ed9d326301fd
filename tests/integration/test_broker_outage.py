"""Suite 3: Redis goes away under a web process that keeps calling ``worker.track()``.

Every call returns and is accepted (queued or spooled) while Redis is refused and
while it hangs; every accepted event is delivered to every vendor once Redis is
back, published from the local spool by the same (still running) web process.

How long a call may take (PUBLISH_TIMEOUT, 250 ms) is a product guarantee measured
by the benchmark (``tests/benchmarks/outage.py``: the slowest call while Redis is
stopped / SIGSTOPped vs PUBLISH_TIMEOUT), not here: the slowest calls are printed.
What is asserted is an ordering: Redis hangs for ``HANG`` seconds, and calls that
started after it hung returned before it answered again — a producer that waited
on a hung Redis instead of spooling would hold its first call for the whole hang.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from worker.dev.localstack import RedisServer, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The producer's PUBLISH_TIMEOUT in this test (the default).
PUBLISH_TIMEOUT = 0.25
#: Seconds Redis hangs (SIGSTOP): 20x PUBLISH_TIMEOUT, time for calls to start and return while it hangs.
HANG = 5.0

WEB_PROCESS = """
import json, sys, time
import worker
from worker.producer.publisher import Publisher

tag, seconds, interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
print("ready", flush=True)
start = time.monotonic()
i = 0
while time.monotonic() - start < seconds:
    t0 = time.monotonic()
    try:
        event_id = worker.track("outage_probe", email=f"{i}-{tag}@example.com", properties={"n": i})
        outcome = "accepted"
    except Exception as exc:
        event_id, outcome = None, f"{type(exc).__name__}: {exc}"
    print(json.dumps([i, outcome, time.monotonic() - t0, event_id, round(t0 - start, 3), t0]), flush=True)
    i += 1
    time.sleep(max(0.0, interval - (time.monotonic() - t0)))
spool = Publisher.default().spool
deadline = time.monotonic() + 30
while spool.pending() and time.monotonic() < deadline:
    time.sleep(0.1)
print(json.dumps({"done": i, "spool_left": spool.pending()}), flush=True)
"""


def _email(record: dict) -> str:
    body = record["body"]
    if record["vendor"] == "convertloop":
        return body["person"]["email"]
    if record["vendor"] == "loops":
        return body["email"]
    return body["id"]


@pytest.mark.timeout(600)  # its own waits add up to about 400 s
def test_redis_outage_at_the_producer_loses_nothing_and_never_blocks(
    start_worker, product_env, sandbox_client, unique_email, tmp_path
):
    tag = unique_email.split("@")[0]
    server = RedisServer(persist=True).start()
    consumer = None
    try:
        consumer = start_worker("outage", REDIS_URL=server.url)
        _outage_run(server, consumer, product_env, sandbox_client, tag, tmp_path)
    finally:
        if consumer is not None:
            consumer.stop()  # while its Redis runs: a warm shutdown without Redis waits for its timeout
        server.stop()


def _outage_run(server, consumer, product_env, sandbox_client, tag, tmp_path):
    env = {**product_env, "REDIS_URL": server.url, "SPOOL_DIR": str(tmp_path / "spool"),
           "PUBLISH_TIMEOUT": str(PUBLISH_TIMEOUT)}
    web = subprocess.Popen([sys.executable, "-c", WEB_PROCESS, tag, str(7 + HANG), "0.02"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert web.stdout.readline().strip() == "ready", web.stderr.read()
        time.sleep(1.5)
        server.stop(keep_data=True)                # Redis gone: connections refused
        time.sleep(2.5)
        server.start()                             # back on the same port, with its AOF
        time.sleep(1.5)
        server.proc.send_signal(signal.SIGSTOP)    # Redis hangs: connections accepted, never answered
        hung = time.monotonic()
        time.sleep(HANG)
        server.proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        out, err = web.communicate(timeout=60)
    finally:
        web.kill()
        if server.proc and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith(("[", "{"))]
    calls, summary = lines[:-1], lines[-1]
    assert summary["spool_left"] == 0, f"the web process did not flush its spool: {summary}\n{err[-2000:]}"
    outcomes = Counter(outcome.split(":")[0] for _, outcome, *_ in calls)
    slowest = sorted(calls, key=lambda c: c[2])[-3:]
    print(f"\n{len(calls)} calls: {dict(outcomes)}; slowest: "
          + ", ".join(f"{c[2] * 1000:.1f} ms at t={c[4]}s" for c in slowest))
    failed = [c for c in calls if c[1] != "accepted"]
    assert not failed, f"a call failed although the spool was on: {failed[:3]}\n{err[-3000:]}"
    # Calls never waited on the hung Redis: some that started after it hung had returned before it answered
    # again (the web process's clock is this one's: CLOCK_MONOTONIC). A producer that waited on it would hold
    # its first call there until the hang ended.
    during_hang = [c for c in calls if hung <= c[5] < resumed]
    returned_during_hang = [c for c in during_hang if c[5] + c[2] < resumed]
    print(f"{len(during_hang)} calls started while Redis hung ({HANG:.0f}s), {len(returned_during_hang)} of them "
          f"returned before it answered again")
    assert returned_during_hang, f"no call that started while Redis hung returned before the hang ended: " \
                                 f"calls waited on Redis. Calls then: {during_hang[:3]}; slowest: {slowest}"

    expected = {f"{i}-{tag}@example.com" for i, *_ in calls}
    vendors = ("convertloop", "loops", "conveyour")

    def delivered(vendor: str) -> Counter:
        return Counter(_email(r) for r in sandbox_client.requests(vendor=vendor) if tag in str(r["body"])
                       and r["status"] in (200, 201, 409))

    for vendor in vendors:
        try:
            wait_until(lambda v=vendor: expected <= set(delivered(v)), timeout=90,
                       message=f"every accepted event at {vendor}")
        except AssertionError:
            missing = sorted(expected - set(delivered(vendor)))
            raise AssertionError(f"{len(missing)} accepted events never reached {vendor}, e.g. {missing[:3]}; "
                                 f"worker alive: {consumer.proc.poll() is None}\n{consumer.log()[-4000:]}") from None
    duplicates = {v: sum(n - 1 for n in delivered(v).values()) for v in vendors}
    print(f"all {len(expected)} events reached all three vendors; requests beyond one per event: {duplicates}")


def test_full_spool_refuses_with_enqueue_error(product_env, monkeypatch, tmp_path):
    """Broker down and spool full: the call raises EnqueueError naming SPOOL_MAX_BYTES; nothing is dropped silently."""
    import worker
    from worker.producer.publisher import Publisher
    from worker.settings import get_settings

    server = RedisServer().start()
    monkeypatch.setenv("REDIS_URL", server.url)
    monkeypatch.setenv("SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("SPOOL_MAX_BYTES", "6000")
    get_settings.cache_clear()
    Publisher.reset_default()
    server.stop()
    try:
        accepted, errors = [], []
        for i in range(10):
            try:
                accepted.append(worker.track("sale", email=f"{i}@example.com"))
            except worker.EnqueueError as exc:
                errors.append(str(exc))
        spool = Publisher.default().spool
        assert accepted and errors, (accepted, errors)
        assert spool.pending() == len(accepted), "every accepted event is in the spool"
        assert all("SPOOL_MAX_BYTES" in e and "broker unreachable" in e for e in errors), errors
        assert spool.size() <= 6000
    finally:
        Publisher.reset_default()
        get_settings.cache_clear()


def test_an_operator_flushes_a_spool_a_dead_process_left(product_env, monkeypatch, tmp_path, capsys):
    """Events spooled by a process that ended before Redis came back are published by `spool flush`."""
    import redis

    import worker
    from worker.ops.cli import main
    from worker.producer.publisher import Publisher
    from worker.settings import get_settings

    server = RedisServer(persist=True).start()
    monkeypatch.setenv("REDIS_URL", server.url)
    monkeypatch.setenv("SPOOL_DIR", str(tmp_path / "spool"))
    get_settings.cache_clear()
    Publisher.reset_default()
    server.stop(keep_data=True)
    try:
        ids = [worker.track("sale", email=f"{i}@example.com", vendors=["loops", "conveyour"]) for i in range(3)]
        Publisher.reset_default()  # the web process is gone; its flusher with it
        server.start()
        assert main(["spool", "status"]) == 0
        assert "3 event(s) waiting" in capsys.readouterr().out
        assert main(["spool", "flush"]) == 0
        assert "3 spooled event(s) published" in capsys.readouterr().out
        client = redis.Redis.from_url(server.url)
        queued = [m for q in ("loops", "conveyour") for m in client.lrange(q, 0, -1)]
        assert len(queued) == 6 and all(any(i.encode() in m for i in ids) for m in queued)
        assert main(["spool", "status"]) == 0
        assert "0 event(s) waiting" in capsys.readouterr().out
    finally:
        Publisher.reset_default()
        get_settings.cache_clear()
        server.stop()
