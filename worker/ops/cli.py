"""The operator's commands: status, check, deadletters list|show|replay|purge, retries release, spool status|flush,
metrics (the Prometheus exporter).

Every command reads Redis from REDIS_URL (a Sentinel-managed master too). A configuration Redis refuses (TLS
certificate, password, unknown master name) ends it with exit status 2 and a line saying what to fix; Redis not
answering, with status 1.

Example::

    $ python -m worker check             # is the configuration valid, does Redis (and each Sentinel) answer?
    $ python -m worker status            # per vendor: queued, in flight, waiting retries, breaker, rate, dead letters
    $ python -m worker deadletters list --vendor loops
    $ python -m worker deadletters show 3f9c0d...   # a dead-letter id, or an event id: all of its dead letters
    $ python -m worker deadletters replay --all --vendor loops
    $ python -m worker deadletters recount   # the counts status and metrics read, afresh from every dead letter
    $ python -m worker retries release --vendor loops   # waiting retries due now
    $ python -m worker spool flush      # publish what a producer left in SPOOL_DIR
    $ python -m worker metrics --port 9808   # serve /metrics to Prometheus (worker/ops/export.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import redis
from pydantic import ValidationError

from ..delivery.deadletters import DeadLetter, DeadLetterStore, error_text, other_prefixes
from ..errors import EnqueueError
from ..redisconf import NEARLY_FULL, REDIS_FULL, Memory, RedisConfigError, memory
from ..vendors import VENDORS
from .status import vendor_status

#: Plain text for --help (argparse prints it as is).
DESCRIPTION = "The operator's commands: status, deadletters, retries, spool."
#: Characters of the error (with the vendor's message) shown per row in the table listing.


def _summary(e: DeadLetter) -> dict:
    return e.model_dump(exclude={"event", "request", "raw"})


def prefix_hint(store: DeadLetterStore) -> str | None:
    """When this KEY_PREFIX has no dead letters but others in the same Redis do: a line that says so."""
    from ..settings import get_settings

    if store.count():
        return None
    prefix = get_settings().key_prefix
    others = other_prefixes(store.client, prefix)
    if not others:
        return None
    found = ", ".join(f"{name} ({n})" for name, n in others.items())
    example = next(iter(others))
    return (f"note: no dead letters under KEY_PREFIX={prefix}, but this Redis has dead letters under "
            f"KEY_PREFIX {found}; e.g. KEY_PREFIX={example} python -m worker deadletters list")


def _hint(store: DeadLetterStore) -> None:
    hint = prefix_hint(store)
    if hint:
        print(hint, file=sys.stderr)


def cmd_list(args: argparse.Namespace) -> int:
    store = DeadLetterStore.default()
    entries = store.list(args.vendor)
    if args.json:
        print(json.dumps([_summary(e) for e in entries], indent=2))
        if not entries:
            _hint(store)
        return 0
    if not entries:
        print("no dead letters" + (f" for {args.vendor}" if args.vendor else ""))
        _hint(store)
        return 0
    print(f"{'ID':32}  {'VENDOR':11}  {'OPERATION':9}  {'REASON':17}  {'STATUS':6}  {'ATT':3}  {'FAILED AT':27}  ERROR")
    for e in entries:
        print(f"{e.id:32}  {e.vendor:11}  {e.operation or '-':9}  {e.reason:17}  {str(e.status or '-'):6}  "
              f"{e.attempts:<3}  {e.failed_at:27}  {error_text(e, store.secrets)}")
    print(f"{len(entries)} dead letter(s)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """A dead-letter id prints that entry (a JSON object); an event or task id, its dead letters (a JSON array)."""
    store = DeadLetterStore.default()
    entry = store.get(args.id)
    if entry is not None:
        print(entry.model_dump_json(indent=2))
        return 0
    entries = store.find(args.id)
    if not entries:
        print(f"no dead letter {args.id} (neither a dead-letter id nor the event id of one)", file=sys.stderr)
        _hint(store)
        return 1
    print("[\n" + ",\n".join(e.model_dump_json(indent=2) for e in entries) + "\n]")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from ..producer.api import publish

    store = DeadLetterStore.default()
    if args.all:
        entries = store.list(args.vendor)
        if not entries:
            _hint(store)
    else:
        entries = []
        for key in args.ids:
            found = store.find(key)
            if not found:
                print(f"no dead letter {key} (neither a dead-letter id nor the event id of one)", file=sys.stderr)
                _hint(store)
                return 1
            entries += [e for e in found if (args.vendor is None or e.vendor == args.vendor)
                        and e.id not in {seen.id for seen in entries}]
    replayed = skipped = 0
    for entry in entries:
        if not entry.replayable or entry.event is None:
            print(f"skipped {entry.id}: a {entry.reason} message cannot be replayed (purge it)")
            skipped += 1
            continue
        try:
            # Never to the spool: the entry is removed here, and this process ends before a flusher would run.
            publish(entry.event, [entry.vendor], task_id_suffix=f".replay-{entry.id[:8]}", spool=False)
        except EnqueueError as exc:
            print(f"stopped: {exc}", file=sys.stderr)
            return 1
        store.remove(entry.id)
        replayed += 1
        print(f"replayed {entry.id} -> {entry.vendor} ({entry.operation} event {entry.event_id})")
    print(f"{replayed} replayed, {skipped} skipped")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    store = DeadLetterStore.default()
    purged = store.purge(args.vendor)
    print(f"{purged} dead letter(s) purged")
    if not purged:
        _hint(store)
    return 0


def cmd_recount(args: argparse.Namespace) -> int:
    store = DeadLetterStore.default()
    n = store.recount()
    counts = store.counts()
    found = "; ".join(f"{vendor}: " + ", ".join(f"{reason} {c}" for reason, c in sorted(per.items()))
                      for vendor, per in sorted(counts.items()))
    print(f"{n} dead letter(s) counted" + (f" ({found})" if found else ""))
    return 0


def _redis_line(r: dict[str, Any]) -> str:
    """The ``redis:`` line of ``status``: ``redis: 1.9 MiB used of 2.0 MiB maxmemory (95%, noeviction) FULL``."""
    if r.get("error"):
        return f"redis: memory unknown ({r['error']})"
    line = "redis: " + Memory(r["used_memory"], r["maxmemory"], r["maxmemory_policy"]).describe()
    return line + (f"  FULL ({REDIS_FULL}: it refuses new events)" if r["full"] else "")


def cmd_status(args: argparse.Namespace) -> int:
    status = vendor_status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"{'VENDOR':11}  {'QUEUED':>7}  {'IN FLIGHT':>9}  {'RETRIES':>7}  {'NEXT DUE':>8}  {'HELD':>6}  "
          f"{'BREAKER':26}  {'RATE/S':>11}  DEAD LETTERS")
    for name, v in status["vendors"].items():
        held = v["breaker"] in ("open", "auth_failed") and v["breaker_since"]
        breaker = v["breaker"] + (f" since {v['breaker_since'][11:19]}" if held else "")
        rate = "unlimited" if v["rate_limit"] is None else f"{v['effective_rate']:g}/{v['rate_limit']:g}"
        due = "-" if v["next_retry_in"] is None else f"{v['next_retry_in']:.0f}s"
        dead = ", ".join(f"{reason} {n}" for reason, n in sorted(v["dead_letters"].items())) or "-"
        print(f"{name + ('' if v['enabled'] else '*'):11}  {v['queued']:>7}  {v['in_flight']:>9}  "
              f"{v['retries_waiting']:>7}  {due:>8}  {v['people_held']:>6}  {breaker:26}  {rate:>11}  {dead}")
    for name, v in status["vendors"].items():
        if v["auth_failed"]:
            print(f"{name}: paused since {v['breaker_since']}: the vendor refuses the credentials (answered 401/403 "
                  f"{v['auth_failures_in_a_row']} times in a row); its deliveries wait in the queue. Fix "
                  f"{v['credential_env']}: a probe resumes them once the vendor accepts a request")
    sp = status["spool"]
    print(f"spool {sp['dir']}: {sp['events']} event(s), {sp['bytes']} bytes" + ("" if sp["enabled"] else " (off)"))
    print(_redis_line(status["redis"]))
    if not all(v["enabled"] for v in status["vendors"].values()):
        print("* not configured here (credentials not set)")
    _hint(DeadLetterStore.default())
    return 0


def cmd_retries_release(args: argparse.Namespace) -> int:
    from ..retries.schedule import RetrySchedule

    schedule = RetrySchedule.default()
    for name in [args.vendor] if args.vendor else list(VENDORS):
        print(f"{name}: {schedule.release(name)} waiting retries released to the queue")
    return 0


def cmd_spool_status(args: argparse.Namespace) -> int:
    from ..producer.spool import Spool
    from ..settings import get_settings

    s = get_settings()
    spool = Spool(s.spool_dir, s.spool_max_bytes)
    state = "on" if s.spool_enabled else "off (SPOOL_ENABLED=false)"
    print(f"spool {s.spool_dir} ({state}): {spool.pending()} event(s) waiting, "
          f"{spool.size()} of {s.spool_max_bytes} bytes")
    return 0


def cmd_spool_flush(args: argparse.Namespace) -> int:
    from ..producer.publisher import Publisher

    publisher = Publisher.default()
    if publisher.spool is None:
        print("the spool is off (SPOOL_ENABLED=false)", file=sys.stderr)
        return 1
    before = publisher.spool.pending()
    if not publisher.flush_once():
        print(f"stopped: {publisher.cause()}; {publisher.spool.pending()} event(s) still waiting", file=sys.stderr)
        return 1
    print(f"{before} spooled event(s) published")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from .export import serve

    serve(args.port, args.host)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ..errors import ConfigurationError
    from ..producer.api import check_configuration
    from ..settings import get_settings

    try:
        vendors = check_configuration()
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    target = get_settings().redis_target()
    print(f"ok: {target.check(timeout=args.timeout)}")
    print(f"vendors: {', '.join(vendors)}" if vendors else "vendors: none (ALLOW_NO_VENDORS=true: events go nowhere)")
    client = target.client(socket_connect_timeout=args.timeout, socket_timeout=args.timeout)
    try:
        return _check_memory(memory(client))
    except redis.ResponseError as exc:  # INFO refused: nothing to judge by
        print(f"redis memory: unknown (INFO memory refused: {exc})")
        return 0
    finally:
        client.close()


def _check_memory(m: Memory) -> int:
    """``check``'s verdict on Redis' memory: 1 when it is at maxmemory, a warning above NEARLY_FULL of it or
    with an evicting policy."""
    print(f"redis memory: {m.describe()}")
    evicting = bool(m.max) and m.policy != "noeviction"
    if m.full:
        if evicting:
            print(f"error: Redis is at maxmemory and evicts keys (maxmemory-policy {m.policy}): queued events, "
                  "waiting retries and dead letters may be lost; set maxmemory-policy noeviction and raise "
                  "maxmemory", file=sys.stderr)
        else:
            print(f"error: {REDIS_FULL} ({m.describe()}): it refuses new events (producers spool them) and "
                  "workers take no messages until memory is freed or maxmemory raised (docs: Operations, Sizing Redis)",
                  file=sys.stderr)
        return 1
    if m.share is not None and m.share > NEARLY_FULL:
        print(f"warning: Redis memory above {NEARLY_FULL:.0%} of maxmemory ({m.describe()}): raise maxmemory "
              "before it refuses events (docs: Operations, Sizing Redis)", file=sys.stderr)
    if evicting:
        print(f"warning: maxmemory-policy is {m.policy}: at maxmemory Redis would evict queued events; "
              "use noeviction", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("deadletters", help="list, show, replay or purge dead letters")
    dsub = dl.add_subparsers(dest="action", required=True)
    vendor: dict[str, Any] = {"choices": list(VENDORS), "help": "only this vendor's dead letters"}

    ls = dsub.add_parser("list", help="list dead letters, oldest first")
    ls.add_argument("--vendor", **vendor)
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.set_defaults(func=cmd_list)

    show = dsub.add_parser("show", help="print a dead letter in full (or every dead letter of an event)",
                           description="Print a dead letter in full, as JSON. ID is a dead-letter id (prints that "
                                       "entry) or an event id, or a task id EVENT.VENDOR as Flower shows it (prints "
                                       "an array of that event's dead letters).")
    show.add_argument("id", metavar="ID", help="a dead-letter id, or an event id")
    show.set_defaults(func=cmd_show)

    rp = dsub.add_parser("replay", help="send dead letters to their vendor again")
    rp.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids, or event ids (all of their dead letters)")
    rp.add_argument("--all", action="store_true", help="every dead letter (of --vendor)")
    rp.add_argument("--vendor", **vendor)
    rp.set_defaults(func=cmd_replay)

    pg = dsub.add_parser("purge", help="delete dead letters for good")
    pg.add_argument("--vendor", **vendor)
    pg.set_defaults(func=cmd_purge)

    rc = dsub.add_parser("recount", help="count the stored dead letters by vendor and reason afresh (status and "
                                         "metrics read these counts)")
    rc.set_defaults(func=cmd_recount)

    st = sub.add_parser("status", help="per vendor: queued, in flight, waiting retries, breaker, rate, dead letters")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)

    rt = sub.add_parser("retries", help="deliveries waiting in Redis to be tried again")
    rsub = rt.add_subparsers(dest="action", required=True)
    rl = rsub.add_parser("release", help="make waiting retries due now (e.g. after fixing a vendor)")
    rl.add_argument("--vendor", choices=list(VENDORS), help="only this vendor's retries")
    rl.set_defaults(func=cmd_retries_release)

    ck = sub.add_parser("check", help="check the configuration (a vendor enabled), and that Redis (and its "
                                      "Sentinels) answer")
    ck.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer (default 5)")
    ck.set_defaults(func=cmd_check)

    sp = sub.add_parser("spool", help="events a producer kept on local disk while Redis was unreachable")
    ssub = sp.add_subparsers(dest="action", required=True)
    ssub.add_parser("status", help="how many events wait in SPOOL_DIR").set_defaults(func=cmd_spool_status)
    ssub.add_parser("flush", help="publish them now").set_defaults(func=cmd_spool_flush)

    from .export import DEFAULT_HOST, DEFAULT_PORT

    mt = sub.add_parser("metrics", help="serve /metrics to Prometheus: every worker's counts and live gauges")
    mt.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    mt.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; "
                                                         "0.0.0.0 in a container)")
    mt.set_defaults(func=cmd_metrics)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "deadletters" and args.action == "replay" and bool(args.ids) == bool(args.all):
        p.error("replay takes dead letter IDs or --all (not both)")
    try:
        return args.func(args)
    except (ValidationError, RedisConfigError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        from ..settings import get_settings

        target = get_settings().redis_target()
        where, problem = target.describe(), target.explain(exc)
        if problem:
            print(f"configuration error: Redis ({where}): {problem}", file=sys.stderr)
            return 2
        print(f"error: Redis ({where}) did not answer: {exc}", file=sys.stderr)
        return 1
