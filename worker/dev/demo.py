"""python -m worker.demo: the whole product on this machine, with sample traffic.

It starts a private ``redis-server`` (or uses ``--redis-url``), the vendor sandbox,
a Celery worker and Flower (on a free port unless ``--flower-port`` names one),
then sends traffic that shows a delivery to every vendor, a retry (a 503 from
Loops, then success) and a dead letter (a 422 from ConveYour), and prints what
happened, read from the sandbox's request log and the dead-letter store. It runs
until Ctrl-C or SIGTERM, or for ``--exit-after`` seconds; then it stops the
worker, Flower, the sandbox and Redis, in that order.

Example::

    $ python -m worker.demo --exit-after 0     # show the outcome, then stop
    $ python -m worker.demo --flower-port 5555 # Flower there (an error if the port is taken)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: Plain text for --help.
DESCRIPTION = "The whole product on this machine, with sample traffic (see README: make demo)."
#: Flower's demo login (it only listens on loopback).
FLOWER_LOGIN = "demo:demo"
#: Mailing lists the demo maps segment names to.
DEMO_MAILING_LISTS = {"vip": "list_vip", "trial": "list_trial"}
#: The demo's KEY_PREFIX (the CLI needs it to see the demo's dead letters).
DEMO_KEY_PREFIX = "vdw-demo"
#: Seconds the demo waits for something it caused to show up before it gives up.
WAIT = 60.0
#: What the sandbox's injected failures look for in a request body: the demo sends one event of each.
RETRIED_MARK = '"upgraded"'
REJECTED_MARK = '"jack"'
#: The first line the demo prints once everything is shown (tests wait for it).
READY_LINE = "running: Ctrl-C or SIGTERM stops the worker, Flower, the sandbox and Redis"

Record = dict[str, Any]


class DemoError(Exception):
    """Something the demo set up did not happen; the message says what."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: stop cleanly."""


# -- what happened, from the sandbox's records (pure functions) --------------------------------------------------


def mentions(record: Record, mark: str) -> bool:
    """True if ``record`` (a sandbox request record) carries ``mark`` in its body or Idempotency-Key."""
    return mark in json.dumps(record.get("body")) or mark == record.get("idempotency_key")


def calls(record: Record) -> int:
    """Deliveries one request carried (a ConveYour bulk identify carries several)."""
    return len(record["body"]) if isinstance(record.get("body"), list) else 1


def delivered(status: int | None) -> bool:
    return status is not None and (200 <= status < 300 or status == 409)


def attempts_text(statuses: Sequence[int | None]) -> str:
    """What one delivery's requests were answered, e.g. ``answered 503, then 200: delivered on attempt 2``."""
    if not statuses:
        return "no request reached the vendor"
    answered = "answered " + ", then ".join(str(s) for s in statuses)
    first_ok = next((i for i, s in enumerate(statuses) if delivered(s)), None)
    if first_ok is None:
        return f"{answered}: not delivered after {len(statuses)} attempt(s)"
    if first_ok == 0:
        return f"{answered}: delivered on attempt 1, without a retry"
    return f"{answered}: delivered on attempt {first_ok + 1}"


def event_report(records: Iterable[Record], vendors: Sequence[str], mark: str) -> dict[str, list[Record]]:
    """Per vendor, the requests that carried the event ``mark`` names, oldest first."""
    out: dict[str, list[Record]] = {v: [] for v in vendors}
    for r in sorted(records, key=lambda r: r["seq"]):
        if r["vendor"] in out and mentions(r, mark):
            out[r["vendor"]].append(r)
    return out


def delivery_lines(event_id: str, label: str, per_vendor: dict[str, list[Record]]) -> list[str]:
    """The summary of one event sent to several vendors: a heading, then each vendor's own requests."""
    everywhere = all(rs and delivered(rs[-1]["status"]) for rs in per_vendor.values())
    missing = [v for v, rs in per_vendor.items() if not (rs and delivered(rs[-1]["status"]))]
    head = "to every vendor" if everywhere else f"NOT delivered to {', '.join(missing)}"
    lines = [f"delivered: event {event_id} ({label}) {head}; each vendor's requests for this event:"]
    for vendor, rs in per_vendor.items():
        paths = ", ".join(sorted({f"{r['method']} {r['path']}" for r in rs})) or "-"
        lines.append(f"  {vendor:12} {paths:26} {attempts_text([r['status'] for r in rs])}")
    return lines


def totals_line(records: Iterable[Record], vendors: Sequence[str]) -> str:
    """Every request of the run, per vendor and status, labelled as such."""
    counts: dict[str, dict[int | None, int]] = {v: {} for v in vendors}
    for r in records:
        by_status = counts.setdefault(r["vendor"], {})
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    parts = [f"{v} " + (", ".join(f"{n}x{s}" for s, n in sorted(c.items(), key=lambda kv: str(kv[0]))) or "none")
             for v, c in counts.items()]
    return "all requests of this run (every event): " + "; ".join(parts)


# -- the stack ---------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """What the demo started; :meth:`stop` ends it workers first, Redis last."""

    redis_server: Any = None
    sandbox: Any = None
    worker: Any = None
    flower: Any = None
    log_dir: str = ""
    stopped: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Stop each part in turn; say so when a process had ended before the demo stopped it."""
        for name, part in (("worker", self.worker), ("flower", self.flower), ("sandbox", self.sandbox),
                           ("redis-server", self.redis_server)):
            if part is None:
                continue
            proc = getattr(part, "proc", None)
            if proc is not None and proc.poll() is not None:
                _say(f"note: {name} (pid {proc.pid}) had already ended, status {proc.returncode}")
            try:
                part.stop()
                self.stopped.append(name)
            except Exception as exc:  # noqa: BLE001 - keep going: a later part must still stop
                print(f"stopping {name} failed: {exc}", file=sys.stderr, flush=True)


class StopSignals:
    """SIGINT and SIGTERM raise :class:`Interrupted` once, until :meth:`disarm` (then they are ignored).

    Inside :meth:`deferred` (while a child process is being spawned, so that it is never started
    without the demo knowing its pid) a signal waits, and is raised when the block ends.
    """

    def __init__(self) -> None:
        self.armed = True
        self.received: int | None = None
        self._deferring = False
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
        if self.armed and not self._deferring:
            self.armed = False
            raise Interrupted(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self.received is not None and self.armed:
            self.armed = False
            raise Interrupted(self.received)

    def disarm(self) -> None:
        self.armed = False

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _say(text: str = "") -> None:
    """Print a line; a closed stdout (``make demo | head``) must not keep the demo from stopping what it started."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def _env(redis_url: str, urls: dict[str, str]) -> dict[str, str]:
    from .localstack import sandbox_env

    return sandbox_env(
        redis_url, urls,
        LOOPS_MAILING_LISTS=json.dumps(DEMO_MAILING_LISTS),
        RETRY_BACKOFF_BASE="0.5",
        RETRY_BACKOFF_MAX="5",
        RETRY_MAX_ATTEMPTS="5",
        KEY_PREFIX=DEMO_KEY_PREFIX,
    )


def _wait(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    from .localstack import wait_until

    return wait_until(predicate, timeout=timeout, message=what, error=DemoError)


def run(args: argparse.Namespace) -> int:
    from .localstack import port_in_use

    if args.flower_port and port_in_use(args.flower_port):
        print(f"demo: --flower-port {args.flower_port}: the port is in use by another program (another demo?); "
              "leave --flower-port out and Flower takes a free port", file=sys.stderr)
        return 2
    stack = Stack(log_dir=tempfile.mkdtemp(prefix="vdw-demo-"))
    signals = StopSignals()
    try:
        _show(args, stack, signals)
        if args.exit_after is None:
            _say(f"\n{READY_LINE}")
            while True:
                time.sleep(3600)
        time.sleep(args.exit_after)
        return 0
    except Interrupted:
        return 0
    except BrokenPipeError:  # stdout went away (make demo | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (DemoError, RuntimeError) as exc:
        print(f"demo failed: {exc}\n(logs in {stack.log_dir})", file=sys.stderr, flush=True)
        return 1
    finally:
        signals.disarm()
        _say("stopping: worker, Flower, sandbox, Redis ...")
        stack.stop()
        _say("stopped")
        signals.restore()


def _show(args: argparse.Namespace, stack: Stack, signals: StopSignals) -> None:
    from .. import clients
    from ..sandbox import Sandbox, SandboxClient
    from ..settings import get_settings
    from ..vendors import VENDORS
    from .localstack import FlowerProcess, RedisServer, WorkerProcess

    if args.redis_url:
        redis_url = args.redis_url
        _check_redis(redis_url)
        _say(f"redis    {shown_url(redis_url)}")
    else:
        stack.redis_server = RedisServer()
        with signals.deferred():
            stack.redis_server.spawn()
        stack.redis_server.wait_started()
        redis_url = stack.redis_server.url
        _say(f"redis    {redis_url}   (private redis-server, pid {stack.redis_server.proc.pid})")
    stack.sandbox = Sandbox(port=args.sandbox_port)
    with signals.deferred():
        stack.sandbox.start()
    _say(f"sandbox  {stack.sandbox.url}   (in this process)")
    env = _env(redis_url, stack.sandbox.base_urls)
    os.environ.update(env)
    get_settings.cache_clear()
    clients.reset()
    name = f"demo-{os.getpid()}"
    stack.worker = WorkerProcess(env, name, log_dir=stack.log_dir)
    with signals.deferred():
        stack.worker.spawn()
    stack.worker.wait_started()
    _say(f"worker   celery -A worker worker -n {name}@%h   (pid {stack.worker.proc.pid}, log: {stack.worker.log_path})")
    stack.flower = FlowerProcess(env, os.path.join(stack.log_dir, "flower.log"), args.flower_port or 0, FLOWER_LOGIN)
    with signals.deferred():
        stack.flower.spawn()
    stack.flower.wait_started()
    _say(f"flower   {stack.flower.url}   (login {FLOWER_LOGIN}, pid {stack.flower.proc.pid}, "
         f"log: {stack.flower.log_path})")

    import worker as product

    vendors = list(VENDORS)
    box = SandboxClient(stack.sandbox.url)
    _say("\nsending sample traffic ...")
    product.identify(email="jill@acme.co", user_id="jill", traits={"first_name": "Jill", "plan": "pro"})
    product.segment(email="jill@acme.co", user_id="jill", add=["vip"], remove=["trial"])
    sale = product.track("made_sale", email="jill@acme.co", user_id="jill", properties={"amount": 1000})
    # All three events at every vendor before the failures are armed: nothing else is in flight then, and
    # ConveYour does not bundle the rejected identify with jill's in one bulk request.
    _wait(lambda: _jill_everywhere(box), "jill's identify, segment and track to reach every vendor")
    # Each failure names the one request it is for: the sandbox answers it to that request only.
    box.configure("loops", fail_next=[{"status": 503, "match": RETRIED_MARK}])
    box.configure("conveyour", fail_next=[{"status": 422, "match": REJECTED_MARK,
                                           "body": {"success": False, "message": "field 'seats' is not a number"}}])
    retried = product.track("upgraded", email="jill@acme.co", properties={"plan": "team"}, vendors=["loops"])
    rejected = product.identify(user_id="jack", traits={"seats": "many"}, vendors=["conveyour"])
    _wait(lambda: any(delivered(r["status"]) for r in box.requests(vendor="loops") if mentions(r, retried)),
          f"event {retried} to reach Loops")
    dead = _wait(lambda: _dead_letters_of(rejected), f"the dead letter of event {rejected}")

    records = box.requests()
    _say()
    for line in delivery_lines(sale, "track made_sale", event_report(records, vendors, '"made_sale"')):
        _say(line)
    loops_tries = [r["status"] for r in event_report(records, ["loops"], retried)["loops"]]
    _say(f"retried:   event {retried} (track upgraded) to loops: {attempts_text(loops_tries)}")
    conveyour_tries = [r["status"] for r in event_report(records, ["conveyour"], REJECTED_MARK)["conveyour"]]
    from ..ops.cli import error_text
    from ..ops.cli import main as cli

    for entry in dead:
        _say(f"dead letter: event {rejected} (identify jack) to {entry.vendor}: answered "
             f"{', then '.join(str(s) for s in conveyour_tries) or 'nothing'}; dead-lettered as {entry.reason} after "
             f"{entry.attempts} attempt(s): {error_text(entry, get_settings().secrets())}")
    _say(totals_line(records, vendors))
    _say("\npython -m worker deadletters list:")
    cli(["deadletters", "list"])
    cli_env = f"REDIS_URL={shown_url(redis_url)} KEY_PREFIX={DEMO_KEY_PREFIX}"
    _say(f"\nsee it:     {cli_env} python -m worker deadletters show {rejected}")
    _say(f"replay it:  {cli_env} python -m worker deadletters replay {rejected}")
    _say(f"Flower shows the dead letter as FAILURE (DeadLettered) and the retry (RETRY, then SUCCESS): "
         f"{stack.flower.url}/tasks")


def _jill_everywhere(box: Any) -> bool:
    """Each vendor holds jill's identify, segment and track (read from the sandbox's final state: her identify and
    segment may have gone as one merged request)."""
    cl = box.state("convertloop", "jill@acme.co") or {}
    lp = box.state("loops", "jill@acme.co") or {}
    cy = box.state("conveyour", "jill") or {}
    return bool("vip" in cl.get("segments", ()) and cl.get("attributes", {}).get("first_name") == "Jill"
                and cl.get("events") and lp.get("properties", {}).get("first_name") == "Jill"
                and True in lp.get("mailing_lists", {}).values() and lp.get("events")
                and "vip" in cy.get("tags", ()) and cy.get("traits", {}).get("first_name") == "Jill"
                and cy.get("events"))


def shown_url(url: str) -> str:
    """``url`` fit to print: a password in it becomes ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _check_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5).ping()
    except (redis.RedisError, ValueError) as exc:
        raise DemoError(f"--redis-url {shown_url(url)}: {type(exc).__name__}: {exc}") from None


def _dead_letters_of(event_id: str) -> list:
    from ..delivery.deadletters import DeadLetterStore

    return DeadLetterStore.default().find(event_id)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker.demo", description=DESCRIPTION)
    p.add_argument("--redis-url", help="use this Redis instead of starting a private redis-server")
    p.add_argument("--flower-port", type=int, default=None,
                   help="Flower's port (default: a free one; the demo prints it); an error if it is in use")
    p.add_argument("--sandbox-port", type=int, default=0, help="the sandbox's port (default: a free one)")
    p.add_argument("--exit-after", type=float, default=None, metavar="SECONDS",
                   help="stop this long after the traffic was shown (default: run until Ctrl-C or SIGTERM)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
