"""The producer's bounded wait: the slowest ``worker.track()`` call while Redis is away, vs ``PUBLISH_TIMEOUT``.

A web process (a subprocess, its own private ``redis-server``, its own spool
directory) calls ``worker.track()`` every 20 ms while the benchmark stops Redis
(connections refused), starts it again, then SIGSTOPs it (connections accepted,
never answered) and SIGCONTs it. Each call's duration is measured in the web
process; calls are assigned to a phase by when they started (CLOCK_MONOTONIC is
shared by the processes). Every call must be accepted (queued or spooled) and the
spool must be empty at the end, or the run is broken (BenchError).

Rows: the slowest call (p100) with Redis stopped, and with Redis hung, each against
``PUBLISH_TIMEOUT`` (target ratio <= 1.0: the product promises the caller never
waits longer). The integration test ``test_broker_outage.py`` checks that nothing is
lost and that calls return; this figure is where the time bound is measured.

Example::

    python -m tests.benchmarks --only outage
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from worker.dev.localstack import RedisServer

from .stack import REPO, BenchError, BenchStack, Row, Sizes

GROUP = "outage"
PUBLISH_TIMEOUT = 0.25

WEB_PROCESS = """
import json, sys, time
import worker
from worker.producer.publisher import Publisher

seconds, interval = float(sys.argv[1]), float(sys.argv[2])
worker.track("outage_probe", email="warm@example.com")   # connection pooled, code paths warm
print("ready", flush=True)
start = time.monotonic()
i = 0
while time.monotonic() - start < seconds:
    t0 = time.monotonic()
    try:
        worker.track("outage_probe", email=f"{i}@example.com", properties={"n": i})
        outcome = "accepted"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    print(json.dumps([t0, time.monotonic() - t0, outcome]), flush=True)
    i += 1
    time.sleep(max(0.0, interval - (time.monotonic() - t0)))
spool = Publisher.default().spool
deadline = time.monotonic() + 30
while spool.pending() and time.monotonic() < deadline:
    time.sleep(0.1)
print(json.dumps({"done": i, "spool_left": spool.pending()}), flush=True)
"""


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    phase = 1.0 if sizes.smoke else 3.0
    server = RedisServer(persist=True).start()
    spool = tempfile.mkdtemp(prefix="vdw-bench-spool-")
    env = {**os.environ, **stack.env, "REDIS_URL": server.url, "SPOOL_DIR": spool,
           "PUBLISH_TIMEOUT": str(PUBLISH_TIMEOUT)}
    web = subprocess.Popen([sys.executable, "-c", WEB_PROCESS, str(5 * phase), "0.02"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks: dict[str, tuple[float, float]] = {}
    try:
        if web.stdout.readline().strip() != "ready":
            raise BenchError(f"outage: the web process did not start: {web.stderr.read()[-2000:]}")
        time.sleep(phase)
        t = time.monotonic()
        server.stop(keep_data=True)                  # refused
        time.sleep(phase)
        marks["stopped"] = (t, time.monotonic())
        server.start()
        time.sleep(phase)
        t = time.monotonic()
        server.proc.send_signal(signal.SIGSTOP)      # hung: accepted, never answered
        time.sleep(phase)
        marks["hung"] = (t, time.monotonic())
        server.proc.send_signal(signal.SIGCONT)
        out, err = web.communicate(timeout=120)
    finally:
        web.kill()
        if server.proc and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith(("[", "{"))]
    calls, summary = lines[:-1], lines[-1]
    failed = [c for c in calls if c[2] != "accepted"]
    if failed or summary.get("spool_left"):
        raise BenchError(f"outage: {len(failed)} calls failed ({failed[:2]}), spool left {summary}: {err[-2000:]}")
    rows = []
    for name, label in (("stopped", "Redis stopped (refused)"), ("hung", "Redis SIGSTOPped (hung)")):
        lo, hi = marks[name]
        took = [c[1] for c in calls if lo <= c[0] < hi]
        if not took:
            raise BenchError(f"outage: no call while {label}")
        stack.say(f"outage, {label}: {len(took)} calls, slowest {max(took) * 1000:.1f} ms")
        rows.append(Row.compare(f"producer call p100 while {label}, {len(took)} calls, vs PUBLISH_TIMEOUT",
                                max(took) * 1000, PUBLISH_TIMEOUT * 1000, "ms", at_most=1.0, calls=len(took),
                                sorted_ms=sorted(round(x * 1000, 2) for x in took)[-10:]))
    return rows
