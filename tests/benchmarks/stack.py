"""What every benchmark figure shares: the private stack, backlog preloading, timing, the table.

Noisy figures are measured ``Sizes.repeats`` times and reported as the median with
its range (:meth:`Row.repeated`); the ratio is median ÷ median::

    >>> r = Row.repeated("x", [10.0, 12.0, 11.0], [5.0, 6.0, 5.5], "/s", at_least=1.5)
    >>> (r.ours, r.baseline, round(r.ratio, 2), r.met, r.ours_stats["min"], r.runs)
    (11.0, 5.5, 2.0, True, 10.0, 3)

:class:`BenchStack` starts a private ``redis-server``, the vendor sandbox in its
own process (so it never shares the bench driver's GIL) and points this process
(the producer) at both. Figures start worker processes through
:meth:`BenchStack.workers` and empty Redis and the sandbox between runs.

Backlogs are preloaded by *cloning* one message the real producer wrote: the
template is taken off the queue, and N copies with fresh event ids, task ids and
delivery tags are LPUSHed in pipelined batches (100 000 messages in seconds,
where the producer path would take minutes). The worker cannot tell them apart.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from worker import keys
from worker.dev.localstack import VENDOR_ENV_PREFIXES, RedisServer, WorkerProcess, sandbox_env, terminate, wait_until
from worker.sandbox import SandboxClient, base_urls
from worker.vendors import VENDORS

REPO = Path(__file__).resolve().parents[2]

#: kombu's Redis transport keeps messages a worker holds here until they are acked.
UNACKED_KEY = "unacked"
#: The module a worker imports (``--include``) to run the no-op baseline task.
NOOP_MODULE = "tests.benchmarks.noop"


class BenchError(RuntimeError):
    """Something broke (lost events, unexpected vendor answers, dead letters): not a missed target."""


# -- sizes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    enqueue_calls: int = 5000
    enqueue_warmup: int = 300
    enqueue_block: int = 50
    throughput_events: int = 10_000
    sandbox_capacity_requests: int = 6000
    #: An extra, diagnostic 100 ms-latency run with this many threads (0: skip): 32, the default until 2026-12-07.
    latency_extra_concurrency: int = 32
    #: Greenlets of the gevent-pool worker (``-P gevent -c N``) in the deliveries/s rows (0: skip them).
    gevent_concurrency: int = 200
    #: An extra, diagnostic run with the per-delivery INFO log lines silenced.
    diagnose_logging: bool = True
    #: An extra, diagnostic run with METRICS_ENABLED=false: what counting costs a worker.
    diagnose_metrics: bool = True
    #: Extra, diagnostic runs (no-op tasks and deliveries) with Celery's own task-event publishing.
    diagnose_events: bool = True
    #: An extra, diagnostic run sending with httpcore, the library (``tests.benchmarks.libhttp``): what the worker's
    #: own HTTP/1.1 exchange saves a delivery.
    diagnose_http: bool = True
    rate_limits: tuple[float, ...] = (10.0, 50.0)
    rate_processes: tuple[int, ...] = (1, 2, 4)
    rate_warmup: float = 3.0
    rate_window: float = 10.0
    memory_backlog: int = 100_000
    #: The comparison: a backlog that lasts just the sampling time.
    memory_small_backlog: int = 1000
    memory_seconds: float = 60.0
    memory_rate: float = 10.0
    batch_rate: float = 5.0
    batch_size: int = 50
    batch_warmup: float = 3.0
    batch_window: float = 12.0
    #: Web handlers: requests of each kind (with / without the call) per run, with Redis up and with it stopped.
    web_requests: int = 2000
    #: Fresh interpreters per side of the import figure (alternating ours and the baseline).
    import_runs: int = 15
    #: Calls per capacity figure (Redis commands per delivery, bytes per dead letter).
    capacity_events: int = 5000
    web_spool_requests: int = 1000
    web_warmup: int = 200
    #: Seconds of each event-loop phase (Redis up, stopped, hung), and the clients calling meanwhile.
    web_phase: float = 5.0
    web_clients: int = 4
    #: Ordering on vs off: track calls (one per person) published each way and drained by one worker.
    ordering_calls: int = 3000
    #: The merged backlog: identify/segment calls over this many people, drained at this rate (requests/s).
    ordering_backlog_calls: int = 10_000
    ordering_backlog_people: int = 1000
    ordering_backlog_rate: float = 10.0
    #: Redis bytes per queued and per waiting delivery: this many messages of each format (the ``bytes`` group).
    bytes_messages: int = 20_000
    #: How often a noisy figure (enqueue, deliveries/s, batching) is measured: the table shows the median and range.
    repeats: int = 3
    smoke: bool = False

    @classmethod
    def full(cls) -> Sizes:
        return cls()

    @classmethod
    def small(cls) -> Sizes:
        return cls(enqueue_calls=300, enqueue_warmup=50, throughput_events=500, sandbox_capacity_requests=500,
                   latency_extra_concurrency=0, diagnose_logging=False, diagnose_events=False, diagnose_http=False,
                   rate_limits=(50.0,), rate_processes=(1, 4), rate_warmup=1.0, rate_window=3.0, memory_backlog=5000,
                   memory_small_backlog=200, memory_seconds=6.0,
                   batch_warmup=1.0, batch_window=4.0, import_runs=3, capacity_events=300,
                   web_requests=200, web_spool_requests=100, web_warmup=50,
                   web_phase=1.5, ordering_calls=500, ordering_backlog_calls=500,
                   ordering_backlog_people=50, ordering_backlog_rate=50.0, bytes_messages=1000, repeats=1, smoke=True)


# -- results --------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table. ``ratio`` = ours / baseline; ``met`` None = informational (no target)."""

    figure: str
    ours: float | None
    baseline: float | None
    unit: str
    target: str = "—"
    ratio: float | None = None
    met: bool | None = None
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: For a repeated figure: {"values", "median", "min", "max"} of ours / of the baseline (None: one measurement).
    ours_stats: dict[str, Any] | None = None
    baseline_stats: dict[str, Any] | None = None
    #: How many times the figure was measured.
    runs: int = 1

    @classmethod
    def repeated(cls, figure: str, ours: list[float], baseline: list[float] | None, unit: str, /, *,
                 at_most: float | None = None, at_least: float | None = None, notes: str = "",
                 **details: Any) -> Row:
        """A row from repeated measurements: values are medians, the ratio is median ÷ median."""
        ours_stats = spread(ours)
        base_stats = spread(baseline) if baseline else None
        row = cls.compare(figure, ours_stats["median"], base_stats["median"] if base_stats else None, unit,
                          at_most=at_most, at_least=at_least, notes=notes, **details)
        row.ours_stats, row.baseline_stats, row.runs = ours_stats, base_stats, len(ours)
        return row

    @classmethod
    def compare(cls, figure: str, ours: float, baseline: float | None, unit: str, /, *, at_most: float | None = None,
                at_least: float | None = None, notes: str = "", **details: Any) -> Row:
        ratio = ours / baseline if baseline else None
        target, met = "—", None
        if at_most is not None:
            target, met = f"<= {at_most:g}x", ratio is not None and ratio <= at_most
        elif at_least is not None:
            target, met = f">= {at_least:g}", ratio is not None and ratio >= at_least
        return cls(figure, ours, baseline, unit, target, ratio, met, notes, details)


def spread(values: list[float]) -> dict[str, Any]:
    """Median and range of repeated measurements (the median of an even count is the mean of the middle two)."""
    if not values:
        raise ValueError("no values")
    v = sorted(values)
    mid = len(v) // 2
    median = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
    return {"values": list(values), "median": median, "min": v[0], "max": v[-1]}


def median_run(runs: list[dict[str, Any]], key: str = "per_second") -> dict[str, Any]:
    """The run whose ``key`` is the median of the runs' (the upper middle one of an even count): its other
    figures (CPU, footnotes) are the ones a row quotes beside the median."""
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def format_value(value: float | None, unit: str, stats: dict[str, Any] | None = None) -> str:
    """``339 /s`` or, for a repeated figure, ``339 /s (326–351)``."""
    if value is None:
        return "—"
    out = f"{_fmt(value)} {unit}".strip()
    if stats and len(stats["values"]) > 1:
        out += f" ({_fmt(stats['min'])}–{_fmt(stats['max'])})"
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def render_table(rows: list[Row], full: bool) -> str:
    header = ("figure", "ours", "baseline", "ratio", "target", "met?")
    lines = []
    for r in rows:
        met = "—" if r.met is None else ("pass" if r.met else "MISS")
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append((r.figure, format_value(r.ours, r.unit, r.ours_stats),
                      format_value(r.baseline, r.unit, r.baseline_stats), ratio, r.target, met))
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]

    def fmt(cols: Iterable[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(list(cols), widths, strict=True)).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)]
    notes = [f"  [{i + 1}] {r.figure}: {r.notes}" for i, r in enumerate(rows) if r.notes]
    if notes:
        out += ["", "notes:", *notes]
    runs = max((r.runs for r in rows), default=1)
    if runs > 1:
        out += ["", f"(a range after a value: median of {runs} runs (min–max); ratios are median ÷ median)"]
    if not full:
        out += ["", "(smoke sizes: the figures show the harness works; the numbers are not the targets' measure)"]
    return "\n".join(out)


def environment() -> dict[str, Any]:
    import celery
    import kombu

    try:
        redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        redis_version = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis_py": redis.__version__,
        "redis_server": redis_version,
        "load_average_at_start": load,
        "git_commit": git_commit(),
    }


def cpu_model() -> str | None:
    """The first ``model name`` in /proc/cpuinfo (None elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def git_commit() -> str | None:
    """Short hash of HEAD, with ``+dirty`` if the work tree has changes (untracked files included)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if status else "")) or None


def write_json(path: str, rows: list[Row], env: dict[str, Any], sizes: Sizes, elapsed: float,
               errors: list[str]) -> None:
    doc = {
        "environment": env,
        "sizes": asdict(sizes),
        "elapsed_seconds": round(elapsed, 1),
        "errors": errors,
        "rows": [asdict(r) for r in rows],
    }
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


# -- statistics -----------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


# -- memory ---------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` and its children (VmRSS from /proc), 0 if gone."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (from /proc/<pid>/stat), 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return out
    for task in tasks:
        try:
            kids = [int(x) for x in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        for kid in kids:
            out += [kid, *_children(kid)]
    return out


# -- the stack ------------------------------------------------------------------


class SandboxProcess:
    """``python -m worker.sandbox --port 0`` in its own process."""

    def __init__(self, log_dir: str) -> None:
        self.log_path = Path(log_dir) / "sandbox.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> SandboxProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.sandbox", "--port", "0"], cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def listening() -> str | None:
            if self.proc.poll() is not None:
                raise BenchError(f"sandbox exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("sandbox listening on "):
                    return line.removeprefix("sandbox listening on ").strip()
            return None

        self.url = wait_until(listening, timeout=timeout, message="the sandbox to listen")
        return self

    def stop(self) -> None:
        terminate(self.proc)
        if getattr(self, "_log", None):
            self._log.close()


class BenchStack:
    """Private Redis + sandbox process + this process configured as the producer."""

    def __init__(self, log_dir: str | None = None, verbose: bool = True) -> None:
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="vdw-bench-")
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        self.verbose = verbose
        self.redis_server: RedisServer | None = None
        self.sandbox: SandboxProcess | None = None
        self._workers: list[WorkerProcess] = []

    # lifecycle

    def start(self) -> BenchStack:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> BenchStack:
        self.redis_server = RedisServer().start()
        self.sandbox = SandboxProcess(self.log_dir).start()
        self.control = SandboxClient(self.sandbox.url, timeout=60)
        self.env = sandbox_env(
            self.redis_server.url,
            base_urls(self.sandbox.url),
            CONVERTLOOP_RATE_LIMIT="0",
            LOOPS_RATE_LIMIT="0",
            CONVEYOUR_RATE_LIMIT="0",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )
        # The producer (this process) reads its settings from the environment on first import.
        for key in [k for k in os.environ if k.startswith(VENDOR_ENV_PREFIXES)]:
            del os.environ[key]
        os.environ.update(self.env)
        from worker import clients
        from worker.settings import get_settings

        get_settings.cache_clear()
        clients.reset()
        self.r = redis.Redis.from_url(self.redis_server.url)
        return self

    def stop(self) -> None:
        self.stop_workers()
        if self.sandbox:
            self.sandbox.stop()
        if self.redis_server:
            self.redis_server.stop()

    def __enter__(self) -> BenchStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def say(self, msg: str) -> None:
        if self.verbose:
            print(f"  · {msg}", flush=True)

    def clean(self) -> None:
        """Empty Redis and the sandbox (records, switches, buckets) between runs."""
        self.r.flushdb()
        self.control.reset()

    # workers

    def workers(self, n: int, queues: str, *, name: str, include_noop: bool = False,
                extra_args: tuple[str, ...] = (), **env: Any) -> list[WorkerProcess]:
        """Start ``n`` worker processes consuming ``queues`` (comma-separated), all ready on return."""
        wenv = {**self.env, **{k: str(v) for k, v in env.items()}}
        args = ["-Q", queues, *extra_args]
        if include_noop:
            args += ["--include", NOOP_MODULE]
        procs = [WorkerProcess(wenv, f"{name}-{i}-{uuid.uuid4().hex[:4]}", tuple(args), self.log_dir)
                 for i in range(n)]
        errors: list[BaseException] = []

        def start(p: WorkerProcess) -> None:
            try:
                p.start(timeout=60)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(p,)) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._workers += procs
        if errors:
            self.stop_workers()
            raise BenchError(f"a worker did not start: {errors[0]}")
        return procs

    def stop_workers(self) -> None:
        procs, self._workers = self._workers, []
        threads = [threading.Thread(target=p.stop) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # preloading

    def template(self, make: Callable[[], str], queue: str) -> dict[str, Any]:
        """Call the producer once (``make``), take the message it put on ``queue`` off again."""
        before = self.r.llen(queue)
        make()
        wait_until(lambda: self.r.llen(queue) > before, timeout=10, message=f"the producer's message on {queue}")
        raw = self.r.rpop(queue)
        if raw is None:
            raise BenchError(f"no template message on {queue}")
        return json.loads(raw)

    def preload(self, template: dict[str, Any], queue: str, n: int,
                vary: Callable[[int, dict[str, Any]], None] | None = None, chunk: int = 2000) -> list[str]:
        """LPUSH ``n`` copies of ``template`` onto ``queue``; returns their task ids.

        Each copy gets a fresh event id (task id ``<event id>.<vendor>``) and delivery tag;
        ``vary(i, event)`` may change the event further (e.g. the email). A copy keeps the template's format:
        the product's compact message, or Celery's own (base64 body, ``root_id``, ``correlation_id``, the
        arguments' repr), each field the template has written as its writer would.
        """
        from worker.envelope import argsrepr, decode_body, delivery_tag

        args, kwargs, embed = decode_body(template)
        b64 = template["properties"].get("body_encoding") == "base64"
        ids: list[str] = []
        batch: list[str] = []
        order: list[tuple[str, ...]] = []
        is_delivery = len(args) == 2 and isinstance(args[1], dict)
        for i in range(n):
            if is_delivery:
                event = copy.deepcopy(args[1])
                event["id"] = uuid.uuid4().hex
                if vary:
                    vary(i, event)
                call_args, task_id = [args[0], event], f"{event['id']}.{args[0]}"
            else:  # e.g. the no-op task
                call_args, task_id = args, uuid.uuid4().hex
            message = dict(template)
            if b64:
                body = json.dumps([call_args, kwargs, embed])
                message["body"] = base64.b64encode(body.encode()).decode()
            else:
                message["body"] = json.dumps([call_args, kwargs, embed], separators=(",", ":"))
            headers = {**template["headers"], "id": task_id}
            if "root_id" in headers:
                headers["root_id"] = task_id
            if "argsrepr" in headers:  # the product's summary in its own messages, Celery's repr in Celery's
                compact_delivery = is_delivery and not b64
                headers["argsrepr"] = argsrepr(args[0], event["operation"]) if compact_delivery else repr(
                    tuple(call_args))
            message["headers"] = headers
            message["properties"] = {**template["properties"], "delivery_tag": delivery_tag() if not b64
                                     else str(uuid.uuid4())}
            if "correlation_id" in template["properties"]:
                message["properties"]["correlation_id"] = task_id
            if is_delivery and keys.HEADER in template["headers"]:
                # As the producer does: each copy in its person's order, in the same MULTI as its message.
                key = VENDORS[args[0]].person_key(event["identity"])
                person = keys.person_id(key) if key else None
                message["headers"][keys.HEADER] = person
                if person:
                    order.extend(keys.order_commands(self.env.get("KEY_PREFIX", "vdw"), args[0], person,
                                                         task_id, json.dumps(event, separators=(",", ":"))))
            batch.append(json.dumps(message) if b64 else json.dumps(message, separators=(",", ":")))
            ids.append(task_id)
            if len(batch) >= chunk:
                self._push(queue, batch, order)
                batch, order = [], []
        if batch:
            self._push(queue, batch, order)
        return ids

    def _push(self, queue: str, messages: list[str], order: list[tuple[str, ...]]) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.lpush(queue, *messages)
        for command in order:
            pipe.execute_command(*command)
        pipe.execute()

    # measuring

    def time_drain(self, queue: str, n: int, timeout: float, poll: float = 0.01) -> tuple[float, float]:
        """Wait until ``queue`` is empty and nothing is unacked; returns (first take, last ack) as monotonic times.

        The start is the first poll that sees fewer than ``n`` messages on the queue.
        """
        start = None
        deadline = time.monotonic() + timeout
        while True:
            pipe = self.r.pipeline(transaction=False)
            pipe.llen(queue)
            pipe.hlen(UNACKED_KEY)
            queued, unacked = pipe.execute()
            now = time.monotonic()
            if start is None and queued < n:
                start = now
            if queued == 0 and unacked == 0:
                return (start if start is not None else now), now
            if now > deadline:
                raise BenchError(f"{queue}: still {queued} queued and {unacked} unacked after {timeout:.0f}s")
            time.sleep(poll)

    def vendor_stats(self, vendor: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.control.stats()["vendors"][vendor]["by_status"].items()}

    def check_clean(self, vendor: str, allowed: Iterable[int] = (200,)) -> None:
        """Raise BenchError on dead letters or vendor answers other than ``allowed``."""
        dead = self.r.hlen("vdw:deadletters")
        if dead:
            raise BenchError(f"{dead} dead letter(s) during the run")
        odd = {s: c for s, c in self.vendor_stats(vendor).items() if int(s) not in set(allowed)}
        if odd:
            raise BenchError(f"{vendor}: unexpected answers from the sandbox: {odd}")
