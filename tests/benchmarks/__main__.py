"""``python -m tests.benchmarks [--smoke] [--json PATH] [--only FIGURE...] [--profile DIR] [--strict] [--no-table]``.

Starts a private Redis and the sandbox, runs the figure groups, prints one table
(figure, ours, baseline, ratio, target, met?) and writes it as JSON with the
environment. A full run of every group also rewrites the Performance table in docs/performance.md
from that JSON (``readme.py``); ``--smoke``, ``--only`` and ``--no-table`` never do.
Exit status: 0 when every figure was produced (targets missed or not: the table says),
1 when something broke (an exception, lost events, a figure missing); with ``--strict``
also 2 when a target was missed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from . import (
    batching,
    capacity,
    enqueue,
    imports,
    memory,
    msgbytes,
    ordering,
    outage,
    ratelimit,
    readme,
    retries,
    throughput,
    web,
)
from .stack import BenchStack, Row, Sizes, environment, render_table, write_json

GROUPS = {m.GROUP: m for m in (imports, enqueue, outage, web, throughput, ordering, ratelimit, memory, msgbytes,
                               capacity, batching, retries)}


def _loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--smoke", action="store_true", help="small sizes (CI): checks the harness, not the targets")
    parser.add_argument("--json", metavar="PATH", help="write the table here (default bench-results.json, "
                                                       "bench-smoke.json with --smoke)")
    parser.add_argument("--only", nargs="+", choices=sorted(GROUPS), metavar="FIGURE",
                        help=f"run only these figure groups: {', '.join(GROUPS)}")
    parser.add_argument("--profile", metavar="DIR", help="also profile a worker draining the throughput backlog "
                                                        "with py-spy; raw stacks go to DIR")
    parser.add_argument("--strict", action="store_true", help="exit 2 if a target is missed")
    parser.add_argument("--no-table", "--no-readme", dest="no_table", action="store_true",
                        help="do not rewrite docs/performance.md's table (a full run of every group does by default)")
    parser.add_argument("--log-dir", help="keep worker and sandbox logs here (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.small() if args.smoke else Sizes.full()
    json_path = args.json or ("bench-smoke.json" if args.smoke else "bench-results.json")
    groups = args.only or list(GROUPS)
    if args.profile:
        from pathlib import Path

        Path(args.profile).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows: list[Row] = []
    errors: list[str] = []
    print(f"benchmark ({'smoke' if args.smoke else 'full'} sizes): {', '.join(groups)}", flush=True)
    env = environment()  # before anything starts: the load average is the machine's, not ours
    with BenchStack(log_dir=args.log_dir) as stack:
        print(f"  logs in {stack.log_dir}", flush=True)
        for name in groups:
            t0 = time.monotonic()
            print(f"[{name}]", flush=True)
            try:
                module = GROUPS[name]
                got = module.run(stack, sizes, args.profile) if name == "throughput" else module.run(stack, sizes)
                if not got:
                    raise RuntimeError("produced no figure")
                rows += got
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status says so
                traceback.print_exc()
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                try:
                    stack.stop_workers()
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
            print(f"  ({name} took {time.monotonic() - t0:.0f}s)", flush=True)
    elapsed = time.monotonic() - started
    env["load_average_at_end"] = _loadavg()  # with the start's: was the machine busy with something else?
    print()
    print(render_table(rows, full=not args.smoke))
    write_json(json_path, rows, env, sizes, elapsed, errors)
    print(f"\n{len(rows)} rows in {elapsed:.0f}s on {env['cpu_count']} CPUs "
          f"(load average at start {env['load_average_at_start']}); JSON: {json_path}")
    if args.smoke or args.only or args.no_table:
        print("docs/performance.md not touched (only a full run of every group writes its table)")
    else:
        changed = readme.update_page(json_path)
        print(f"docs/performance.md: Performance table {'rewritten' if changed else 'unchanged'} from {json_path}")
    if errors:
        print("\nBROKEN:", *errors, sep="\n  ", file=sys.stderr)
        return 1
    missed = [r.figure for r in rows if r.met is False]
    if not args.smoke:
        print(f"targets: {sum(1 for r in rows if r.met)} pass, {len(missed)} miss")
    if args.strict and missed:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
