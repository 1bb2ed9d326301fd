"""A web handler's added latency from the producer call, and the event loop while Redis is away.

Two real servers, each serving a handler that calls the API and the same handler
without it (``tests/benchmarks/webapps/``): Flask under gunicorn (one sync worker,
the blocking ``worker.track``) and FastAPI under uvicorn (``await worker.aio.track``),
on a Redis of their own that the benchmark stops and hangs.

- **Added latency**: one client, requests one at a time, ``/with`` and ``/without``
  interleaved in blocks (the order alternating), timed at the client; p50 and p99
  of each, with Redis up and with Redis stopped (every call then writes the local
  spool, fsynced). Targets with Redis up: at most 1 ms added at p50, 3 ms at p99.
- **Event loop**: a ticker in the uvicorn process sleeps 1 ms at a time and records
  how late it wakes (``/lag``), less the time the loop's thread spent waiting for a
  CPU (the kernel's run-queue wait: on a busy 2-core machine that alone reaches tens
  of ms, with or without the API; the wall-clock figure is in the row's footnote).
  Four clients call ``/with`` for a phase while Redis is up, stopped (refused) and
  SIGSTOPped (hung), in ``Sizes.repeats`` rounds; the median of the rounds' longest
  stalls of each phase is compared with 5 ms (a maximum over thousands of ticks is
  noisy on a shared machine: the range shows every round). The reference is
  ``/without`` under the same load. The footnotes give the CPU time the hypervisor
  took from the machine during each round's phase (``steal`` in /proc/stat), which
  no figure here can subtract.

Nothing may be lost: every ``/with`` answers 200 with an event id, and at the end
of each part every id's three messages are on the vendor queues (published from
the spool once Redis is back), or the run is broken (BenchError).

Example::

    python -m tests.benchmarks --only web
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from worker.dev.localstack import AppServer, RedisServer, wait_until

from .stack import REPO, BenchError, BenchStack, Row, Sizes, median_run, percentile

GROUP = "web"
PUBLISH_TIMEOUT = 0.25
#: Most milliseconds a call may add to a handler, with Redis up (p50, p99), and the longest loop stall.
ADDED_P50_MS, ADDED_P99_MS, STALL_MS = 1.0, 3.0, 5.0
VENDOR_QUEUES = ("convertloop", "loops", "conveyour")


class Client:
    """One keep-alive HTTP connection (gunicorn's sync worker closes it after each answer: then it reconnects)."""

    def __init__(self, port: int, ids: list[str]) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.ids = ids
        self.n = 0

    def get(self, kind: str) -> None:
        self.n += 1
        self.conn.request("GET", f"/{kind}?n={self.n}")
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise BenchError(f"web: /{kind} answered {resp.status}: {body[:500]!r}")
        if kind == "with":
            self.ids.append(json.loads(body)["event"])

    def close(self) -> None:
        self.conn.close()


def latencies(client: Client, requests: int, block: int) -> dict[str, list[float]]:
    """``requests`` each of /with and /without, interleaved in blocks; sorted client-side latencies in ms."""
    client.conn.close()  # a fresh connection: the server may have closed an idle keep-alive one
    out: dict[str, list[float]] = {"with": [], "without": []}
    order = ["with", "without"]
    clock = time.perf_counter
    done = 0
    while done < requests:
        n = min(block, requests - done)
        for kind in order:
            for _ in range(n):
                t0 = clock()
                client.get(kind)
                out[kind].append((clock() - t0) * 1000)
        order.reverse()
        done += n
    return {k: sorted(v) for k, v in out.items()}


def load(port: int, kind: str, seconds: float, clients: int, ids: list[str]) -> int:
    """``clients`` threads calling /``kind`` back to back for ``seconds``; returns the number of calls."""
    counts, errors = [0] * clients, []
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        own: list[str] = []
        c = Client(port, own)
        try:
            while time.monotonic() < stop:
                c.get(kind)
                counts[i] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            c.close()
            ids.extend(own)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise BenchError(f"web: a client failed under load: {errors[0]}")
    return sum(counts)


def lag(port: int) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", "/lag")
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def check_delivered_to_queues(redis_url: str, ids: list[str], spools: list[Path]) -> None:
    """Every accepted call's three messages are on the vendor queues (the spools drained first); then empty Redis
    and ``ids``, for the next part."""
    import redis

    wait_until(lambda: not any(any(s.glob("*.json*")) for s in spools if s.exists()), timeout=60,
               message="the web processes to publish their spools")
    client = redis.Redis.from_url(redis_url)
    try:
        found = set()
        for queue in VENDOR_QUEUES:
            for raw in client.lrange(queue, 0, -1):
                found.add(json.loads(raw)["headers"]["id"])
        missing = {f"{i}.{q}" for i in ids for q in VENDOR_QUEUES} - found
        if missing:
            raise BenchError(f"web: {len(missing)} of {3 * len(ids)} messages of accepted calls are not on the "
                             f"queues, e.g. {sorted(missing)[:3]}")
        client.flushdb()
        ids.clear()
    finally:
        client.close()


def _added_row(figure: str, ours: list[float], base: list[float], limit: float | None, **details) -> Row:
    row = Row.repeated(figure, ours, base, "ms", **details)
    added = row.ours - row.baseline
    row.details["added_ms"] = round(added, 3)
    if limit is not None:
        row.target, row.met = f"added <= {limit:g} ms", added <= limit
    return row


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    server = RedisServer(persist=True).start()
    work = Path(tempfile.mkdtemp(prefix="vdw-bench-web-"))
    spools = {"wsgi": work / "spool-wsgi", "asgi": work / "spool-asgi"}
    base_env = {**os.environ, **stack.env, "REDIS_URL": server.url, "PUBLISH_TIMEOUT": str(PUBLISH_TIMEOUT)}
    py = sys.executable
    apps = {
        "wsgi": AppServer([py, "-m", "gunicorn", "-w", "1", "-b", "127.0.0.1:{port}",
                           "tests.benchmarks.webapps.wsgi_app:app"],
                          {**base_env, "SPOOL_DIR": str(spools["wsgi"])}, Path(stack.log_dir) / "web-gunicorn.log",
                          cwd=REPO),
        "asgi": AppServer([py, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--no-access-log",
                           "--log-level", "warning", "tests.benchmarks.webapps.asgi_app:app"],
                          {**base_env, "SPOOL_DIR": str(spools["asgi"])}, Path(stack.log_dir) / "web-uvicorn.log",
                          cwd=REPO),
    }
    label = {"wsgi": "blocking track() in Flask under gunicorn", "asgi": "await aio.track() in FastAPI under uvicorn"}
    ids: list[str] = []
    clients: dict[str, Client] = {}
    rows: list[Row] = []
    phases: dict[str, list[dict]] = {"without": [], "up": [], "stopped": [], "hung": []}
    try:
        for app in apps.values():
            app.start()
        clients = {k: Client(a.port, ids) for k, a in apps.items()}
        for c in clients.values():  # warm up: connections, code paths, the process's publisher
            latencies(c, sizes.web_warmup, sizes.enqueue_block)

        # -- added latency, Redis up --------------------------------------------------------------
        runs: dict[str, list[dict[str, list[float]]]] = {k: [] for k in apps}
        for i in range(sizes.repeats):
            for kind, c in clients.items():
                runs[kind].append(latencies(c, sizes.web_requests, sizes.enqueue_block))
                r = runs[kind][-1]
                stack.say(f"web {kind}, Redis up, run {i + 1}: p50 {percentile(r['with'], 50):.2f} vs "
                          f"{percentile(r['without'], 50):.2f} ms, p99 {percentile(r['with'], 99):.2f} vs "
                          f"{percentile(r['without'], 99):.2f} ms")
        for kind in apps:
            for q, limit in ((50, ADDED_P50_MS), (99, ADDED_P99_MS)):
                rows.append(_added_row(
                    f"web handler p{q}, {label[kind]}, Redis up: with the call vs without",
                    [percentile(r["with"], q) for r in runs[kind]], [percentile(r["without"], q) for r in runs[kind]],
                    limit, requests=sizes.web_requests))

        # -- Redis stopped: latency through the spool -----------------------------------------------
        server.stop(keep_data=True)
        for c in clients.values():
            latencies(c, sizes.web_warmup // 5 or 1, sizes.enqueue_block)  # every process knows Redis is down
        spool_runs: dict[str, list[dict[str, list[float]]]] = {k: [] for k in apps}
        for i in range(sizes.repeats):
            for kind, c in clients.items():
                spool_runs[kind].append(latencies(c, sizes.web_spool_requests, sizes.enqueue_block))
                r = spool_runs[kind][-1]
                stack.say(f"web {kind}, Redis stopped, run {i + 1}: p50 {percentile(r['with'], 50):.2f} vs "
                          f"{percentile(r['without'], 50):.2f} ms")
        for kind in apps:
            for q in (50, 99):
                rows.append(_added_row(
                    f"web handler p{q}, {label[kind]}, Redis stopped (the spool): with the call vs without",
                    [percentile(r["with"], q) for r in spool_runs[kind]],
                    [percentile(r["without"], q) for r in spool_runs[kind]], None,
                    requests=sizes.web_spool_requests))
        server.start()
        check_delivered_to_queues(server.url, ids, list(spools.values()))

        # -- the event loop: each phase once per round, Redis up, stopped (refused), SIGSTOPped (hung) ------
        port = apps["asgi"].port
        for i in range(sizes.repeats):
            stack.say(f"web loop, round {i + 1} of {sizes.repeats}")
            phases["without"].append(_phase(port, "without", sizes, ids))
            phases["up"].append(_phase(port, "with", sizes, ids))
            check_delivered_to_queues(server.url, ids, list(spools.values()))
            server.stop(keep_data=True)
            phases["stopped"].append(_phase(port, "with", sizes, ids))
            server.start()
            check_delivered_to_queues(server.url, ids, list(spools.values()))
            server.proc.send_signal(signal.SIGSTOP)
            try:
                phases["hung"].append(_phase(port, "with", sizes, ids))
            finally:
                server.proc.send_signal(signal.SIGCONT)
            check_delivered_to_queues(server.url, ids, list(spools.values()))
    finally:
        for c in clients.values():
            c.close()
        for app in apps.values():
            app.stop()
        if server.proc and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()

    stall = "event loop longest stall (less waiting for a CPU)"
    n = {k: sum(p["calls"] for p in v) // len(v) for k, v in phases.items()}
    rows.append(_stall_row(f"{stall}, uvicorn, {sizes.web_clients} clients on the handler without the call "
                           f"(reference), {n['without']} requests a phase", phases["without"], None))
    rows.append(_stall_row(f"{stall}, uvicorn, {sizes.web_clients} clients calling aio.track(), Redis up, "
                           f"{n['up']} calls a phase (reference)", phases["up"], None))
    for key, name in (("stopped", "Redis stopped (refused)"), ("hung", "Redis SIGSTOPped (hung)")):
        rows.append(_stall_row(f"{stall} while {name}, {sizes.web_clients} clients calling aio.track(), "
                               f"{n[key]} calls a phase, vs {STALL_MS:g} ms", phases[key], STALL_MS))
    return rows


def _phase(port: int, kind: str, sizes: Sizes, ids: list[str]) -> dict:
    """``sizes.web_clients`` clients on /``kind`` for one phase: the loop's figures over it (``/lag``), the
    number of calls, and the CPU time the hypervisor took from this machine meanwhile (``steal_ms``)."""
    lag(port)  # resets the figures
    steal = _steal_ms()
    calls = load(port, kind, sizes.web_phase, sizes.web_clients, ids)
    figures = lag(port)
    figures.update(calls=calls, steal_ms=round(_steal_ms() - steal))
    return figures


def _stall_row(figure: str, runs: list[dict], limit: float | None) -> Row:
    """The longest stall of each round's phase: the median and range over the rounds (a maximum over thousands
    of ticks is noisy on a shared machine), the median round's footnote."""
    values = [r["max_net_ms"] for r in runs]
    return Row.repeated(figure, values, [limit] if limit else None, "ms", at_most=1.0 if limit else None,
                        notes=_raw(median_run(runs, "max_net_ms"), runs), rounds=runs)


def _steal_ms() -> float:
    """Milliseconds of CPU the hypervisor has taken from this machine's CPUs (``steal`` in /proc/stat; 0 where
    there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _raw(figures: dict, runs: list[dict]) -> str:
    """The footnote: the median round's wall-clock figure (waiting for a CPU included), its late ticks and
    collections, and the CPU time the hypervisor took during each round's phase."""
    return (f"median round: wall clock, waiting for a CPU included: longest {figures['max_ms']:.1f} ms; ticks over "
            f"5 ms: {figures['over_5ms']} of {figures['ticks']} ({figures['over_5ms_net']} less that wait); longest "
            f"garbage collection {figures.get('gc_max_ms', 0):.1f} ms, {figures.get('gc_full', 0)} full ones; "
            f"CPU taken by the hypervisor (steal) in each round: "
            f"{', '.join(format(r['steal_ms'], 'g') for r in runs)} ms")
