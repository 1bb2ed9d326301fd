"""The demo runs end to end and says what happened; it stops cleanly; Flower shows retries and dead letters.

The demo runs as an operator runs it: a subprocess, in its own session (as a terminal's foreground job), read
line by line from its stdout. What it prints is checked against what its own sandbox and Redis recorded.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

import worker
from worker.delivery.deadletters import DeadLetterStore
from worker.dev.demo import DEMO_KEY_PREFIX, READY_LINE
from worker.dev.localstack import FlowerProcess, free_port, wait_until
from worker.sandbox import SandboxClient

#: Generous: how long the demo may take to get somewhere on a loaded 2-core machine (it takes a few seconds).
PATIENCE = 180

# A test here may wait PATIENCE several times (a line, the demo's exit, the rest of its output): pytest-timeout
# must not cut it off before its own message says what it was waiting for.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(5 * PATIENCE)]


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (tells a pid from a later process given the same pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def descendants(root: int) -> dict[int, str | None]:
    """Every process below ``root`` now, with its start time."""
    children, found, todo = _proc_children(), {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found[pid] = _start_time(pid)
            todo.append(pid)
    return found


def still_running(pids: dict[int, str | None]) -> list[int]:
    """Those of ``pids`` still running (the same processes, not zombies)."""
    running = []
    for pid, started in pids.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if started is not None and fields[19] == started and fields[0] != "Z":
            running.append(pid)
    return running


def started_for(tmp: Path) -> list[int]:
    """Every running process started by the demo run whose TMPDIR is ``tmp``: found by what it inherited
    (that TMPDIR), or, for redis-server (which overwrites its environment with its title), by its
    directory in ``tmp``; so a child the demo lost track of (reparented to init) is found too."""
    marker = f"TMPDIR={tmp}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if (marker in Path(f"/proc/{entry}/environ").read_bytes()
                    or os.readlink(f"/proc/{entry}/cwd").startswith(f"{tmp}/")):
                found.append(int(entry))
        except OSError:
            continue
    return still_running({pid: _start_time(pid) for pid in found})


def kill_leftovers(tmp: Path) -> None:
    """After a failed test: SIGKILL what a demo left running (nothing when it passed)."""
    for pid in started_for(tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Demo:
    """``python -m worker.demo`` as a subprocess in its own session, its stdout read line by line."""

    args: tuple[str, ...]
    tmp: Path
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue = field(default_factory=queue.Queue)

    def start(self) -> Demo:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CONVERTLOOP_", "LOOPS_", "CONVEYOUR_", "SENTRY_", "REDIS_URL", "KEY_PREFIX"))}
        env["TMPDIR"] = str(self.tmp)  # the demo's log directory goes here
        self.stderr = self.tmp / "stderr.txt"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "worker.demo", *self.args], env=env,
                                         stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, prefix: str) -> str:
        """The first line (from now on, or already read) that starts with ``prefix``."""
        for line in self.lines:
            if line.startswith(prefix):
                return line
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"the demo ended before printing {prefix!r}:\n" + self.output())
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line from the demo after {PATIENCE}s:\n" + self.output())

    def finish(self, sig: int | None = None, group: bool = False) -> int:
        """Send ``sig`` (to the demo, or its whole process group as a terminal's Ctrl-C does), read the rest."""
        if sig is not None and self.proc.poll() is None:
            (os.killpg if group else os.kill)(self.proc.pid, sig)
        rc = self.proc.wait(PATIENCE)
        while (line := self._queue.get(timeout=PATIENCE)) is not None:
            self.lines.append(line)
        return rc

    def output(self) -> str:
        return "\n".join(self.lines) + "\nstderr:\n" + self.stderr.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    # what the demo printed
    def value(self, prefix: str, pattern: str) -> str:
        match = re.search(pattern, self.wait_for_line(prefix))
        assert match, f"{pattern!r} not in the {prefix!r} line:\n{self.output()}"
        return match.group(1)


def _hold_port(port: int) -> socket.socket | None:
    """Listen on 127.0.0.1:port as another program would; None if another program already does."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.listen()
    return s


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run until its ready line, while another program holds Flower's usual port 5555.

    The tests that use it run in file order; the SIGTERM test, which ends the run, comes last.
    """
    squatter = _hold_port(5555)
    run = Demo((), tmp_path_factory.mktemp("demo")).start()
    try:
        run.wait_for_line(READY_LINE)
        run.children = descendants(run.proc.pid)
        yield run
    finally:
        if run.proc.poll() is None:
            run.finish(signal.SIGTERM)
        run.kill()
        kill_leftovers(run.tmp)
        if squatter is not None:
            squatter.close()


def test_demo_summary_is_what_its_sandbox_and_redis_recorded(demo):
    text = demo.output()
    sandbox = SandboxClient(demo.value("sandbox", r"(http://\S+)"))
    records = sandbox.requests()
    sale = demo.value("delivered:", r"event (\w+) \(track made_sale\) to every vendor")
    retried = demo.value("retried:", r"event (\w+)")
    rejected = demo.value("dead letter:", r"event (\w+)")

    # The event delivered to every vendor: each vendor line is that event's own requests, one 200 each.
    for vendor in ("convertloop", "loops", "conveyour"):
        line = demo.wait_for_line(f"  {vendor} ")
        assert line.endswith("answered 200: delivered on attempt 1, without a retry"), text
        own = [r for r in records if r["vendor"] == vendor and '"made_sale"' in json.dumps(r["body"])]
        assert [r["status"] for r in own] == [200], (vendor, own)
    # The retry: the only 503 anywhere went to the retried event, whose second request was delivered.
    assert demo.wait_for_line("retried:").endswith("to loops: answered 503, then 200: delivered on attempt 2"), text
    assert [r["status"] for r in records if r["idempotency_key"] == retried] == [503, 200]
    assert [r["idempotency_key"] for r in records if r["status"] == 503] == [retried]
    # The run's totals are labelled as such, and are the sandbox's: jill's identify and segment went as one
    # merged request or as two (whether the segment was queued before her turn began), so count them.
    counts = {v: sum(1 for r in records if r["vendor"] == v and r["status"] == 200) for v in ("convertloop", "loops")}
    assert counts["convertloop"] in (2, 3) and counts["loops"] in (3, 4), counts
    assert (f"all requests of this run (every event): convertloop {counts['convertloop']}x200; "
            f"loops {counts['loops']}x200, 1x503") in text

    # The dead letter, with ConveYour's message, is the one in the demo's Redis under its KEY_PREFIX.
    redis_url = demo.value("redis", r"(redis://\S+)")
    store = DeadLetterStore(redis.Redis.from_url(redis_url), DEMO_KEY_PREFIX)
    [entry] = store.list()
    assert (entry.event_id, entry.vendor, entry.status, entry.attempts) == (rejected, "conveyour", 422, 1)
    assert [r["status"] for r in records if r["status"] == 422] == [422]
    line = demo.wait_for_line("dead letter:")
    assert "to conveyour: answered 422; dead-lettered as rejected after 1 attempt(s)" in line, text
    assert "field 'seats' is not a number" in line
    row = demo.wait_for_line(entry.id)
    assert "conveyour answered 422: field 'seats' is not a number" in row and "1 dead letter(s)" in text
    assert sale not in (retried, rejected)


def test_flower_on_a_free_port_when_5555_is_taken(demo):
    url = demo.value("flower", r"(http://127\.0\.0\.1:\d+)")
    assert not url.endswith(":5555"), "5555 is held by another program during this test"
    assert httpx.get(f"{url}/api/workers", timeout=10).status_code == 401, "Flower must ask for a login"
    # This demo's Flower, not another program's: it knows this demo's worker (from its heartbeats).
    worker_name = demo.value("worker", r"-n (demo-\d+)@")
    workers = wait_until(lambda: [name for name in httpx.get(f"{url}/api/workers", params={"status": "true"},
                                                             auth=("demo", "demo"), timeout=10).json()
                                  if name.startswith(worker_name + "@")],
                         timeout=PATIENCE, interval=0.5, message="the demo's worker in Flower")
    assert workers


def test_sigterm_stops_worker_flower_and_redis_leaving_no_process(demo):
    worker_log = Path(demo.value("worker", r"log: (\S+)\)"))
    printed = {int(demo.value(name, r"pid (\d+)")) for name in ("redis", "worker", "flower")}
    assert printed <= set(demo.children), (printed, demo.children)
    assert set(started_for(demo.tmp)) >= printed, "the scan for leftovers must see the running stack"

    rc = demo.finish(signal.SIGTERM)  # what timeout(1), IDEs and Docker send: to the demo alone

    assert rc == 0, demo.output()
    assert demo.lines[-1] == "stopped", demo.output()
    assert not [line for line in demo.lines if "had already ended" in line], demo.output()
    assert still_running(demo.children) == [], demo.output()
    assert started_for(demo.tmp) == []
    log = worker_log.read_text(errors="replace")
    # The worker shut down warmly while Redis still ran: it never saw the broker go.
    assert "Warm shutdown" in log
    assert "Connection to broker lost" not in log, log[-3000:]


def test_ctrl_c_during_startup_stops_what_was_started(tmp_path):
    """A terminal's Ctrl-C goes to the whole foreground process group: Redis must not be the first to go."""
    run = Demo((), tmp_path).start()
    try:
        worker_log = Path(run.value("worker", r"log: (\S+)\)"))  # Redis and the worker run; Flower is starting
        children = descendants(run.proc.pid)
        rc = run.finish(signal.SIGINT, group=True)
        running, leftovers = still_running(children), started_for(run.tmp)
    finally:
        run.kill()
        kill_leftovers(run.tmp)
    assert rc == 0, run.output()
    assert run.lines[-1] == "stopped", run.output()
    assert READY_LINE not in run.lines
    # The demo stopped Redis and the worker itself: neither had ended on the terminal's SIGINT before it got
    # there. (Flower may have: the demo spawns it right after the worker line, and a process group signal
    # that lands between a child's fork and its setsid reaches the child too; the demo then reaps it.)
    ended_early = [line for line in run.lines if "had already ended" in line and not line.startswith("note: flower")]
    assert ended_early == [], run.output()
    assert running == [] and leftovers == [], run.output()
    log = worker_log.read_text(errors="replace")
    assert "Warm shutdown" in log and "Connection to broker lost" not in log, log[-3000:]


def test_a_taken_flower_port_given_on_the_command_line_is_a_clear_error(tmp_path):
    port = free_port()
    squatter = _hold_port(port)
    assert squatter is not None
    try:
        run = Demo(("--flower-port", str(port)), tmp_path).start()
        rc = run.finish()
    finally:
        squatter.close()
    err = run.stderr.read_text()
    assert rc == 2 and f"--flower-port {port}: the port is in use" in err, run.output()
    assert "Traceback" not in err and run.lines == [], run.output()


def test_an_unreachable_redis_url_is_a_clear_error_without_its_password(tmp_path):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    run = Demo(("--redis-url", url, "--exit-after", "0"), tmp_path).start()
    rc = run.finish()
    err = run.stderr.read_text()
    assert rc == 1 and "demo failed: --redis-url redis://:***@127.0.0.1:" in err and "ConnectionError" in err, \
        run.output()
    assert "hunter2" not in run.output() and "Traceback" not in err
    assert run.lines[-1] == "stopped"


def test_flower_that_cannot_bind_its_port_fails_at_once_saying_why(base_env, tmp_path):
    port = free_port()
    squatter = _hold_port(port)
    assert squatter is not None
    flower = FlowerProcess(base_env, tmp_path / "flower.log", port=port)
    try:
        with pytest.raises(RuntimeError, match=f"could not listen on 127.0.0.1:{port}: the port is in use"):
            flower.start(timeout=PATIENCE)
        status = flower.proc.poll()  # read before stop(), which would end it in any case
    finally:
        flower.stop()
        squatter.close()
    assert status is not None and status != 0, f"Flower had not exited by itself with a failure: {status}"


@pytest.fixture(scope="module")
def flower(base_env, worker_factory, tmp_path_factory, leak_watch):
    """Flower on loopback against the test broker (basic auth); its log and task output go to leak_watch."""
    worker_factory("flower-w", RETRY_BACKOFF_MAX=10)  # lets a Retry-After of 5 s stand
    log_path = tmp_path_factory.mktemp("flower") / "flower.log"
    proc = FlowerProcess(base_env, log_path, basic_auth="ops:secret-pw")
    try:
        url = proc.start().url
        yield url
        leak_watch.add_text("flower /api/tasks",
                            httpx.get(f"{url}/api/tasks", auth=("ops", "secret-pw"), timeout=5).text, kind="flower")
    finally:
        proc.stop()
        leak_watch.add_log(log_path)


def flower_task(url: str, task_id: str) -> dict | None:
    tasks = httpx.get(f"{url}/api/tasks", auth=("ops", "secret-pw"), timeout=5).json()
    return tasks.get(task_id)


def test_flower_shows_dead_letter_as_failure_and_the_retry(flower, product_env, sandbox_client, unique_email):
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401, "Flower must ask for a login"
    refusal = {"status": 422, "body": {"message": "field seats is not a number"}}
    sandbox_client.configure("convertloop", fail_next=[refusal])
    dead = worker.identify(email=unique_email, vendors=["convertloop"])
    # Loops answers 503 with Retry-After: 5, so the retry waits about 5 s: long enough to watch Flower show it.
    sandbox_client.configure("loops", fail_next=[{"status": 503, "retry_after": "5"}])
    retried = worker.track("t", email=unique_email, vendors=["loops"])

    # Watch the retried task's state in Flower while its countdown runs: (poll start, poll end, state, task).
    states: list[tuple[float, float, str | None, dict | None]] = []
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        asked = time.time()
        task = flower_task(flower, f"{retried}.loops")
        states.append((asked, time.time(), task and task["state"], task))
        if task and task["state"] == "SUCCESS":
            break
        time.sleep(0.1)
    attempts = [r for r in sandbox_client.requests(vendor="loops") if r["idempotency_key"] == retried]
    assert [r["status"] for r in attempts] == [503, 200]
    failed_at, delivered_at = attempts[0]["ts"], attempts[1]["ts"]
    # Polls made wholly between the two attempts (an answer shows Flower's state at a moment of its poll).
    between = [(state, task) for asked, answered, state, task in states
               if failed_at < asked and answered < delivered_at]
    # Waiting with the vendor's answer: RETRY when Celery's task-retried event reaches Flower after the
    # task-received event of the retry message; when the two race the other way, RECEIVED (still marked retried).
    waiting = [state for state, task in between if state in ("RETRY", "RECEIVED") and task["retried"]
               and "loops answered 503" in task["exception"]]
    sequence = [state for _, _, state, _ in states]
    changes = [s for i, s in enumerate(sequence) if i == 0 or s != sequence[i - 1]]
    print(f"\nFlower states of the retried delivery: {changes}; waiting with the vendor's answer in "
          f"{len(waiting)} of {len(between)} polls during the {delivered_at - failed_at:.1f}s countdown")
    # While the countdown runs the delivery is not in a worker thread: Flower shows it waiting with the vendor's
    # answer (how many polls fell in the countdown depends on the machine: at least one, not a count of them).
    assert waiting, f"Flower never showed the delivery waiting for its retry: {changes}"
    assert "FAILURE" not in sequence, changes
    done = states[-1][3]
    assert done is not None and done["state"] == "SUCCESS" and done["retried"] and done["retries"] == 1, changes
    # The compact message's task name and args summary, as Flower shows them.
    assert (done["name"], done["args"]) == ("worker.deliver", "('loops', <track>)"), done

    failed = wait_until(lambda: (t := flower_task(flower, f"{dead}.convertloop")) and t["state"] == "FAILURE" and t,
                        timeout=20, message="FAILURE in Flower")
    assert (failed["name"], failed["args"], failed["retries"]) == ("worker.deliver", "('convertloop', <identify>)", 0)
    assert "DeadLettered" in failed["exception"]
    exception = failed["exception"]
    assert "convertloop" in exception and "status=422" in exception and "reason=rejected" in exception
    assert "field seats is not a number" in exception, "Flower does not say why"
