"""Deliveries per second: a preloaded backlog of track events to ConvertLoop, drained by one worker.

Each run: empty Redis and the sandbox, preload N messages on the ``convertloop``
queue (clones of one the producer wrote), start one worker process
(``-Q convertloop``, default pool and ``WORKER_CONCURRENCY``), and time from the
first message taken to the last one acknowledged (queue length and kombu's
unacked hash, polled every 10 ms). Every event must reach the sandbox with a 200.

- baseline: the same number of no-op Celery tasks, same queue, pool and concurrency.
- ours: track deliveries, sandbox without latency or limit (no rate limit in the worker).
- ours with 100 ms sandbox latency, against ours without.
- the gevent pool (``-P gevent -c Sizes.gevent_concurrency``): ours without latency, against the threads
  pool's, and with 100 ms latency, against its own without (docs/pools.md).
- diagnosis: the same deliveries with ``METRICS_ENABLED=false`` (what counting costs), and no-op tasks and
  deliveries with Celery's own task-event publishing (``tests.benchmarks.stockevents``: what the batch saves).
- reference: the sandbox's own capacity for one client process with as many threads
  (``loadgen``), to see whether the sandbox is the bottleneck.

The drains are noisy (±15 % between runs), so each is done ``Sizes.repeats`` times,
interleaved (no-op, deliveries, 100 ms latency, diagnoses; then again), and the rows
show medians with their range; ratios are median ÷ median.

Example::

    python -m tests.benchmarks --only throughput
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .stack import REPO, BenchError, BenchStack, Row, Sizes, cpu_seconds, median_run

GROUP = "throughput"
QUEUE = "convertloop"


def _drain(stack: BenchStack, n: int, *, noop: bool, latency_ms: float = 0.0, profile: Path | None = None,
           extra_args: tuple[str, ...] = (), **env: str) -> dict:
    import worker

    from .noop import noop as noop_task

    stack.clean()
    if latency_ms:
        stack.control.configure(QUEUE, latency_ms=latency_ms)
    if noop:
        template = stack.template(lambda: noop_task.delay(), QUEUE)
        stack.preload(template, QUEUE, n)
    else:
        template = stack.template(
            lambda: worker.track("bench_event", email="t@example.com", properties={"plan": "pro", "amount": 1},
                                 vendors=[QUEUE]), QUEUE)
        stack.preload(template, QUEUE, n, vary=lambda i, e: e["identity"].update(email=f"u{i}@example.com"))
    label = "no-op tasks" if noop else f"deliveries (latency {latency_ms:g} ms)"
    procs = stack.workers(1, QUEUE, name="noop" if noop else "tp", include_noop=noop,
                          extra_args=extra_args, **env)
    spy = None
    if profile is not None:
        from .pyspy import PySpy

        spy = PySpy(procs[0].proc.pid, profile)
    pids = {"worker": procs[0].proc.pid, "sandbox": stack.sandbox.proc.pid, "redis": stack.redis_server.proc.pid}
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    try:
        # Longest plausible: 20 events/s.
        start, end = stack.time_drain(QUEUE, n, timeout=max(120.0, n / 20))
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    finally:
        spy_err = spy.stop() if spy else ""
        stack.stop_workers()
    rate = n / (end - start)
    # CPU per message (ms) and share of one core, per process, over the drain (incl. the worker's start-up tail).
    cpu_ms = {k: round(1000 * v / n, 3) for k, v in cpu.items()}
    cpu_share = {k: round(v / (end - start), 2) for k, v in cpu.items()}
    if not noop:
        stats = stack.vendor_stats(QUEUE)
        if stats.get("200", 0) != n:
            raise BenchError(f"throughput: {n} events preloaded, the sandbox answered {stats}")
        stack.check_clean(QUEUE)
    stack.say(f"{n} {label}: {end - start:.2f}s = {rate:,.0f}/s; CPU ms per message {cpu_ms}, "
              f"cores busy {cpu_share}")
    return {"n": n, "seconds": round(end - start, 3), "per_second": rate, "cpu_ms_per_message": cpu_ms,
            "cores_busy": cpu_share, "py_spy_stderr": spy_err[-500:]}


def sandbox_capacity(stack: BenchStack, n: int, threads: int) -> dict:
    stack.clean()
    out = subprocess.run([sys.executable, "-m", "tests.benchmarks.loadgen", stack.sandbox.url, str(n), str(threads)],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=stack.env)
    if out.returncode != 0:
        raise BenchError(f"loadgen failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    stack.say(f"sandbox capacity: {n} requests from {threads} threads: {result['per_second']:,.0f}/s")
    stack.clean()
    return result


def _per_second(runs: list[dict]) -> list[float]:
    return [r["per_second"] for r in runs]


def run(stack: BenchStack, sizes: Sizes, profile_dir: str | None = None) -> list[Row]:
    from worker.settings import get_settings

    n = sizes.throughput_events
    concurrency = get_settings().worker_concurrency
    kinds: dict[str, dict] = {"base": {"noop": True}, "ours": {"noop": False},
                              "slow": {"noop": False, "latency_ms": 100}}
    gevent = ("-P", "gevent", "-c", str(sizes.gevent_concurrency))
    if sizes.gevent_concurrency:
        kinds["green"] = {"noop": False, "extra_args": gevent}
        kinds["green_slow"] = {"noop": False, "latency_ms": 100, "extra_args": gevent}
    if sizes.latency_extra_concurrency:
        kinds["more"] = {"noop": False, "latency_ms": 100, "WORKER_CONCURRENCY": str(sizes.latency_extra_concurrency)}
    if sizes.diagnose_metrics:
        kinds["nometrics"] = {"noop": False, "METRICS_ENABLED": "false"}
    if sizes.diagnose_logging:
        kinds["quiet"] = {"noop": False, "extra_args": ("--include", "tests.benchmarks.quiet")}
    if sizes.diagnose_http:
        kinds["lib_http"] = {"noop": False, "extra_args": ("--include", "tests.benchmarks.libhttp")}
    if sizes.diagnose_events:
        stock = ("--include", "tests.benchmarks.stockevents")
        kinds["stock_base"] = {"noop": True, "extra_args": stock}
        kinds["stock"] = {"noop": False, "extra_args": stock}
    got: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(sizes.repeats):
        if sizes.repeats > 1:
            stack.say(f"throughput run {i + 1} of {sizes.repeats}")
        for kind, kw in kinds.items():
            got[kind].append(_drain(stack, n, **kw))
    base, ours = median_run(got["base"]), median_run(got["ours"])
    cap = sandbox_capacity(stack, sizes.sandbox_capacity_requests, concurrency)
    rows = [
        Row.repeated(f"deliveries/s, {n:,} track → ConvertLoop, no latency, vs no-op tasks/s",
                     _per_second(got["ours"]), _per_second(got["base"]), "/s", at_least=0.70,
                     notes=f"threads pool, concurrency {concurrency}, 1 process; in the median run worker CPU per "
                           f"message {ours['cpu_ms_per_message']['worker']} ms vs "
                           f"{base['cpu_ms_per_message']['worker']} ms for a no-op, worker busy "
                           f"{ours['cores_busy']['worker']} cores; sandbox capacity for one "
                           f"{concurrency}-thread client process ≈ {cap['per_second']:,.0f}/s",
                     ours=got["ours"], baseline=got["base"]),
        Row.repeated(f"deliveries/s, {n:,} track, sandbox latency 100 ms, vs no latency (threads pool, "
                     f"{concurrency} threads)",
                     _per_second(got["slow"]), _per_second(got["ours"]), "/s", at_least=0.90,
                     notes=f"ceiling from concurrency alone: {concurrency} threads / 0.1 s = {concurrency * 10}/s",
                     ours=got["slow"]),
        Row("sandbox capacity (reference): one client process, "
            f"{concurrency} threads, ConvertLoop event_logs", cap["per_second"], None, "/s", details=cap),
    ]
    if "green" in got:
        g, green, green_slow = sizes.gevent_concurrency, median_run(got["green"]), median_run(got["green_slow"])
        rows += [
            Row.repeated(f"deliveries/s, no latency: gevent pool (-P gevent -c {g}) vs threads pool ({concurrency})",
                         _per_second(got["green"]), _per_second(got["ours"]), "/s", at_least=0.95,
                         notes=f"worker CPU per message {green['cpu_ms_per_message']['worker']} ms vs "
                               f"{ours['cpu_ms_per_message']['worker']} ms (median runs)",
                         ours=got["green"], baseline=got["ours"]),
            Row.repeated(f"deliveries/s, {n:,} track, sandbox latency 100 ms, vs no latency (gevent pool, "
                         f"{g} greenlets)",
                         _per_second(got["green_slow"]), _per_second(got["green"]), "/s", at_least=0.90,
                         notes=f"ceiling from concurrency alone: {g} / 0.1 s = {g * 10:,}/s; worker CPU per message "
                               f"{green_slow['cpu_ms_per_message']['worker']} ms, busy "
                               f"{green_slow['cores_busy']['worker']} cores (median run)",
                         ours=got["green_slow"]),
        ]
    if "more" in got:
        c = sizes.latency_extra_concurrency
        rows.append(Row.repeated(f"(diagnosis) 100 ms latency with WORKER_CONCURRENCY={c}, vs no latency",
                                 _per_second(got["more"]), _per_second(got["ours"]), "/s", ours=got["more"]))
    if "nometrics" in got:
        on, off = median_run(got["ours"]), median_run(got["nometrics"])
        rows.append(Row.repeated("(diagnosis) deliveries/s with metrics counted (the default) vs METRICS_ENABLED=false",
                                 _per_second(got["ours"]), _per_second(got["nometrics"]), "/s",
                                 notes=f"worker CPU per message {on['cpu_ms_per_message']['worker']} ms vs "
                                       f"{off['cpu_ms_per_message']['worker']} ms (median runs)",
                                 ours=got["ours"], baseline=got["nometrics"]))
    if "quiet" in got:
        quiet = median_run(got["quiet"])
        rows.append(Row.repeated("(diagnosis) deliveries/s without per-delivery INFO lines, vs no-op tasks/s",
                                 _per_second(got["quiet"]), _per_second(got["base"]), "/s",
                                 notes="loggers httpx, worker.delivery.pipeline, celery.app.trace, "
                                       "celery.worker.strategy "
                                       f"at WARNING; worker CPU per message {quiet['cpu_ms_per_message']['worker']} "
                                       "ms (median run)",
                                 ours=got["quiet"]))
    if "lib_http" in got:
        lib = median_run(got["lib_http"])
        rows.append(Row.repeated("(diagnosis) deliveries/s, the worker's HTTP/1.1 exchange (worker/http11.py) vs "
                                 "httpcore's connection pool, the library",
                                 _per_second(got["ours"]), _per_second(got["lib_http"]), "/s",
                                 notes="tests.benchmarks.libhttp: one httpcore.ConnectionPool per process (h11, "
                                       "keep-alive); worker CPU per message "
                                       f"{ours['cpu_ms_per_message']['worker']} ms vs "
                                       f"{lib['cpu_ms_per_message']['worker']} ms with httpcore (median runs)",
                                 ours=got["ours"], baseline=got["lib_http"]))
    if "stock" in got:
        cpu = {k: median_run(got[k])["cpu_ms_per_message"]["worker"] for k in ("ours", "stock", "base", "stock_base")}
        rows += [
            Row.repeated("(diagnosis) deliveries/s, task events batched (the default) vs published every loop turn "
                         "(Celery's own)", _per_second(got["ours"]), _per_second(got["stock"]), "/s",
                         notes=f"worker CPU per message {cpu['ours']} ms vs {cpu['stock']} ms (median runs); "
                               "tests.benchmarks.stockevents",
                         ours=got["ours"], baseline=got["stock"]),
            Row.repeated("(diagnosis) no-op tasks/s, task events batched (the default) vs published every loop turn "
                         "(Celery's own)", _per_second(got["base"]), _per_second(got["stock_base"]), "/s",
                         notes=f"worker CPU per message {cpu['base']} ms vs {cpu['stock_base']} ms (median runs)",
                         ours=got["base"], baseline=got["stock_base"]),
            Row.repeated("(diagnosis) deliveries/s vs no-op tasks/s, both with Celery's own task-event publishing",
                         _per_second(got["stock"]), _per_second(got["stock_base"]), "/s",
                         ours=got["stock"], baseline=got["stock_base"]),
        ]
    if profile_dir:
        out = Path(profile_dir) / "throughput-worker.pyspy.txt"
        prof = _drain(stack, n, noop=False, profile=out)
        from .pyspy import render, summarize

        summary = summarize(out)
        print(f"\nprofile of the worker draining {n:,} deliveries ({prof['per_second']:,.0f}/s under py-spy), "
              f"raw stacks in {out}:\n{render(summary)}\n", flush=True)
        rows.append(Row("(profiled run, not a figure) deliveries/s under py-spy", prof["per_second"], None, "/s",
                        details={"profile": summary, "raw": str(out)}))
    return rows
