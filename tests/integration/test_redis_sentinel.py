"""Redis Sentinel: a master, a replica and three Sentinels on loopback, real workers, web processes sending steadily.

* The master is SIGKILLed under steady traffic: producer calls go on returning while there is no master
  (spooling), the Sentinels promote the replica, the web process publishes its spool there, the workers
  reconnect to it, and every event reaches every vendor.
* A planned failover (``SENTINEL FAILOVER``) leaves the old master running — and taking writes from every
  client still connected to it — until the Sentinels turn it into a replica, about ten seconds later, which
  throws those writes away. A producer with ``PUBLISH_WAIT_REPLICAS=1`` counts a write as queued only once
  a replica confirmed it (Redis' ``WAIT``, counted on the nodes), so it spools them instead, and every one of
  its events is delivered; a producer without it, sending next to it, is measured (and printed), not asserted
  on: whether it loses anything depends on how fast the workers are.
* With the first Sentinel down, every Redis user asks the others.
* The workers take messages with this product's atomic take (``worker/broker/transport.py``) under Sentinel too.
* A master name the Sentinels do not monitor is a configuration error for the producer, the CLI and a
  worker alike.

How long a call takes is printed, not asserted on (the benchmark measures the PUBLISH_TIMEOUT bound): that
calls do not wait for the failover is asserted as an ordering — calls that started after the master died
returned before the replica was promoted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import email_of
from worker.dev.localstack import SentinelStack, terminate, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PUBLISH_TIMEOUT = 0.25
#: Seconds between two calls of a web process: 25 events a second, each to three vendors.
INTERVAL = 0.04
VENDORS = ("convertloop", "loops", "conveyour")

#: A web process: calls worker.track() every INTERVAL until the stop file exists, one JSON line per call
#: (index, queued/spooled/error, seconds, email, start on CLOCK_MONOTONIC); then waits for its spool to drain.
WEB_PROCESS = """
import json, os, sys, time
import worker
from worker.producer.publisher import Publisher

tag, interval, stop = sys.argv[1], float(sys.argv[2]), sys.argv[3]
outcomes = []
_publish = Publisher.publish
def publish(self, *args, **kwargs):  # observe what each call did (queued or spooled)
    outcomes.append(_publish(self, *args, **kwargs))
    return outcomes[-1]
Publisher.publish = publish
print("ready", flush=True)
i = 0
while not os.path.exists(stop):
    t0 = time.monotonic()
    email = f"{i}-{tag}@example.com"
    try:
        worker.track("failover_probe", email=email, properties={"n": i})
        outcome = outcomes[-1]
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    print(json.dumps([i, outcome, time.monotonic() - t0, email, t0]), flush=True)
    i += 1
    time.sleep(max(0.0, interval - (time.monotonic() - t0)))
spool = Publisher.default().spool
deadline = time.monotonic() + 60
while spool.pending() and time.monotonic() < deadline:
    time.sleep(0.1)
print(json.dumps({"done": i, "spool_left": spool.pending()}), flush=True)
"""


class WebProcess:
    """A web process (WEB_PROCESS) in its own environment, its spool in its own directory; its output is read
    as it comes (:meth:`calls` so far), so a test can wait for calls to have been made."""

    def __init__(self, env: dict[str, str], tag: str, workdir: Path) -> None:
        self.tag = tag
        self.stop_file = workdir / f"stop-{tag}"
        env = {**env, "SPOOL_DIR": str(workdir / f"spool-{tag}"), "PUBLISH_TIMEOUT": str(PUBLISH_TIMEOUT)}
        self.proc = subprocess.Popen([sys.executable, "-c", WEB_PROCESS, tag, str(INTERVAL), str(self.stop_file)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready", self.proc.stderr.read()
        self.lines: list = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.lines, True), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stderr, self.err, False), daemon=True)]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list, parse: bool) -> None:
        for line in stream:
            if not parse:
                into.append(line)
            elif line.startswith(("[", "{")):
                into.append(json.loads(line))

    def calls(self) -> list[list]:
        """The calls made so far: [index, queued/spooled/error, seconds, email, start on CLOCK_MONOTONIC]."""
        return [c for c in list(self.lines) if isinstance(c, list)]

    def finish(self) -> tuple[list[list], dict, str]:
        """Stop sending; the calls, the summary (spool left), stderr."""
        self.stop_file.touch()
        try:
            self.proc.wait(timeout=90)
        finally:
            self.proc.kill()
        for reader in self.readers:
            reader.join(10)
        err = "".join(self.err)
        assert self.lines and "done" in self.lines[-1], f"the web process did not finish: {err[-3000:]}"
        return self.calls(), self.lines[-1], err


def delivered(sandbox_client, tag: str, vendor: str) -> Counter:
    """Emails of the events with ``tag`` that ``vendor`` accepted, with how often (Loops answers a repeat 409)."""
    return Counter(email_of(vendor, r["body"]) for r in sandbox_client.requests(vendor=vendor)
                   if r["status"] in (200, 201, 409) and tag in json.dumps(r["body"]))


def wait_delivered(sandbox_client, tag: str, expected: set[str], workers, timeout: float = 60) -> None:
    for vendor in VENDORS:
        try:
            wait_until(lambda v=vendor: expected <= set(delivered(sandbox_client, tag, v)), timeout=timeout,
                       interval=0.2, message=f"every event at {vendor}")
        except AssertionError:
            missing = sorted(expected - set(delivered(sandbox_client, tag, vendor)))
            logs = "\n".join(f"--- {w.name} (alive: {w.proc.poll() is None})\n{w.log()[-3000:]}" for w in workers)
            raise AssertionError(f"{len(missing)} of {len(expected)} events never reached {vendor}, "
                                 f"e.g. {missing[:3]}\n{logs}") from None


def assert_accepted(calls: list[list], done: dict, err: str) -> None:
    """Every call was accepted (queued or spooled), and the web process published its spool."""
    assert done["spool_left"] == 0, f"the web process did not publish its spool: {done}\n{err[-3000:]}"
    failed = [c for c in calls if c[1] not in ("queued", "spooled")]
    assert not failed, f"calls failed although the spool was on: {failed[:3]}\n{err[-3000:]}"


def summary(calls: list[list]) -> str:
    outcomes = Counter(c[1].split(":")[0] for c in calls)
    slowest = max(c[2] for c in calls)
    return f"{len(calls)} calls {dict(outcomes)}, slowest {slowest * 1000:.1f} ms"


@pytest.fixture
def stack(leak_watch):
    s = SentinelStack().start()
    yield s
    try:
        for port, node in s.nodes.items():
            if node.proc and node.proc.poll() is None:
                leak_watch.add_redis(node.url, f"sentinel stack node {port}")
    finally:
        s.stop()


@pytest.fixture
def sentinel_env(product_env, stack) -> dict[str, str]:
    return {**product_env, **stack.env}


@pytest.fixture
def web(tmp_path):
    """Start web processes (WebProcess); any still running when the test ends (it failed) is killed."""
    started: list[WebProcess] = []

    def start(env: dict[str, str], tag: str) -> WebProcess:
        started.append(WebProcess(env, tag, tmp_path))
        return started[-1]

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(10)


@pytest.fixture
def workers(stack, start_worker, request):
    """Two workers on the stack, stopped (by ``start_worker``) before it is: a warm shutdown without Redis
    waits for its timeout."""
    return [start_worker(f"{request.node.name[5:25]}-{n}", **stack.env) for n in "ab"]


@pytest.mark.timeout(600)  # its own waits: about 350 s
def test_an_unknown_master_name_is_a_configuration_error_everywhere(stack, sentinel_env, start_worker,
                                                                    unique_email, tmp_path):
    env = {**sentinel_env, "REDIS_SENTINEL_MASTER": "not-monitored", "SPOOL_DIR": str(tmp_path / "spool")}
    expected = "REDIS_SENTINEL_MASTER='not-monitored' is not a master the Sentinels at 127.0.0.1:"
    producer = subprocess.run(
        [sys.executable, "-c", "import worker; from worker.producer.publisher import Publisher\n"
                               f"try:\n    worker.track('x', email={unique_email!r})\nexcept Exception as exc:\n"
                               "    print(type(exc).__name__, exc, Publisher.default().spool.pending())"],
        env=env, capture_output=True, text=True, timeout=60)
    assert producer.stdout.startswith("EnqueueError") and expected in producer.stdout, producer
    assert "(they monitor: 'vdw')" in producer.stdout and producer.stdout.strip().endswith(" 0"), producer.stdout

    cli = subprocess.run([sys.executable, "-m", "worker", "status"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 2 and expected in cli.stderr, (cli.returncode, cli.stderr)
    unset = {k: v for k, v in env.items() if k != "REDIS_SENTINEL_MASTER"}
    cli = subprocess.run([sys.executable, "-m", "worker", "check"], env=unset, capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 2 and "set REDIS_SENTINEL_MASTER" in cli.stderr, (cli.returncode, cli.stderr)

    with pytest.raises(RuntimeError) as started:
        start_worker("sentinel-unknown-master", **{**stack.env, "REDIS_SENTINEL_MASTER": "not-monitored"})
    assert "configuration error" in str(started.value) and expected in str(started.value), started.value

    ok = subprocess.run([sys.executable, "-m", "worker", "check"], env=sentinel_env, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and f"at 127.0.0.1:{stack.master_port()} answered" in ok.stdout, ok


@pytest.mark.timeout(600)  # its own waits: about 260 s
def test_a_sentinel_down_is_no_matter(stack, sentinel_env, start_worker, sandbox_client, unique_email, tmp_path):
    """The first Sentinel in REDIS_URL (the one Celery's broker URL names) is down: producer, worker and CLI
    ask the others."""
    terminate(stack.sentinel_procs[0])
    w = start_worker("sentinel-one-down", **stack.env)
    try:
        env = {**sentinel_env, "SPOOL_DIR": str(tmp_path / "spool")}
        emails = [f"{i}-{unique_email}" for i in range(3)]
        producer = subprocess.run(
            [sys.executable, "-c", "import sys, worker; from worker.producer.publisher import Publisher\n"
                                   "for e in sys.argv[1:]: worker.track('one_down', email=e, vendors=['loops'])\n"
                                   "print(Publisher.default().spool.pending())", *emails],
            env=env, capture_output=True, text=True, timeout=60)
        assert producer.returncode == 0 and producer.stdout.strip() == "0", producer  # queued, none spooled
        wait_until(lambda: set(emails) <= {r["body"]["email"] for r in sandbox_client.requests(vendor="loops")
                                          if r["status"] == 200}, timeout=45, message=f"the events (log: {w.log_path})")
        check = subprocess.run([sys.executable, "-m", "worker", "check"], env=env, capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stderr
    finally:
        w.stop()


@pytest.mark.timeout(900)  # its own waits: about 500 s
def test_master_killed_under_steady_traffic_loses_nothing(stack, sentinel_env, workers, web, sandbox_client,
                                                          unique_email):
    tag = unique_email.split("@")[0]
    producer = web(sentinel_env, tag)
    time.sleep(2)                                # steady traffic to the first master
    killed = time.monotonic()
    old = stack.kill_master()
    new = stack.wait_failover(old)
    promoted = time.monotonic()
    # ...and to the promoted replica: the positive signal is calls made after the promotion.
    wait_until(lambda: len([c for c in producer.calls() if c[4] >= promoted]) >= 50, timeout=60, interval=0.1,
               message="50 calls after the promotion")
    calls, done, err = producer.finish()

    assert_accepted(calls, done, err)
    assert any(c[1] == "spooled" for c in calls), "no call met the failover: the test did not test it"
    after = [c for c in calls if c[4] >= promoted]
    # Calls did not wait for a master: some that started after the kill had returned before the promotion.
    without_master = [c for c in calls if killed <= c[4] and c[4] + c[2] < promoted]
    assert without_master, "no call started after the kill returned before the promotion: calls waited for it"

    expected = {c[3] for c in calls}
    wait_delivered(sandbox_client, tag, expected, workers)
    finished = time.monotonic()
    # Under Sentinel the workers still take each message with the atomic take script (worker/broker/transport.py),
    # on the promoted master too: never kombu's BRPOP.
    commands = stack.nodes[new].client().info("commandstats")
    assert commands.get("cmdstat_eval", {}).get("calls", 0) > 0 and "cmdstat_brpop" not in commands, \
        str({k: v["calls"] for k, v in commands.items()})
    extra = {v: sum(n - 1 for n in delivered(sandbox_client, tag, v).values()) for v in VENDORS}
    print(f"\nSIGKILL of the master {old} -> replica {new} promoted after {promoted - killed:.1f} s; "
          f"{summary(calls)} (PUBLISH_TIMEOUT {PUBLISH_TIMEOUT * 1000:.0f} ms), {len(without_master)} of them "
          f"made and returned while there was no master; {len(after)} calls after the promotion; "
          f"all {len(expected)} events at all {len(VENDORS)} vendors "
          f"{finished - promoted:.1f} s after it; requests beyond one per event: {extra}")


@pytest.mark.timeout(1200)  # its own waits: about 800 s
def test_planned_failover_loses_nothing_with_wait_replicas(stack, sentinel_env, workers, web, sandbox_client,
                                                           unique_email):
    tag = unique_email.split("@")[0]
    safe = web({**sentinel_env, "PUBLISH_WAIT_REPLICAS": "1"}, f"{tag}w")
    plain = web(sentinel_env, f"{tag}p")
    time.sleep(2)
    started = time.monotonic()
    old = stack.master_port()
    stack.sentinel().execute_command("SENTINEL", "FAILOVER", stack.master_name)
    new = stack.wait_failover(old)
    promoted = time.monotonic()
    stack.wait_replica(old)                      # the Sentinels turn the old master into a replica
    converted = time.monotonic()
    time.sleep(2)
    calls, done, err = safe.finish()
    plain_calls, _, _ = plain.finish()

    assert_accepted(calls, done, err)
    expected = {c[3] for c in calls}
    wait_delivered(sandbox_client, f"{tag}w", expected, workers)
    extra = {v: sum(n - 1 for n in delivered(sandbox_client, f"{tag}w", v).values()) for v in VENDORS}
    # PUBLISH_WAIT_REPLICAS really worked: every call it counted as queued had a replica confirm it with Redis'
    # WAIT (the only WAITs on these nodes: the other producer and the workers never send one). A producer that
    # ignored the setting would lose nothing here whenever the workers are quick, but it sends no WAIT.
    queued = sum(1 for c in calls if c[1] == "queued")
    waits = sum(int(node.client().info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
                for node in stack.nodes.values())
    assert queued > 0 and waits >= queued, f"{queued} calls counted as queued, {waits} WAITs on the nodes"

    # The producer without PUBLISH_WAIT_REPLICAS, measured: its calls after the old master became a replica
    # went to the new one, so once those are delivered, what is missing is what Redis threw away.
    at_risk = [c for c in plain_calls if promoted <= c[4] < converted]  # written to the old master only
    late = {c[3] for c in plain_calls if c[4] >= converted}
    wait_delivered(sandbox_client, f"{tag}p", late, workers)
    lost = {v: len({c[3] for c in plain_calls} - set(delivered(sandbox_client, f"{tag}p", v))) for v in VENDORS}
    print(f"\nSENTINEL FAILOVER {old} -> {new}: promoted after {promoted - started:.1f} s, the old master "
          f"took writes until it became a replica {converted - started:.1f} s after the start. "
          f"PUBLISH_WAIT_REPLICAS=1: {summary(calls)}, {waits} WAITs; all {len(expected)} events at all vendors; "
          f"requests "
          f"beyond one per event: {extra}. Without it: {summary(plain_calls)}, {len(at_risk)} of them written to "
          f"the old master after the promotion (kept only if a worker took them before it became a replica); events "
          f"lost per vendor: {lost}")

