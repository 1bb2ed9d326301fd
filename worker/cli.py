"""``python -m worker deadletters list|show|replay|purge`` and ``spool status|flush``: the operator's commands.

Example::

    $ python -m worker deadletters list --vendor loops
    $ python -m worker deadletters replay --all --vendor loops
    $ python -m worker spool flush      # publish what a producer left in SPOOL_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .deadletters import DeadLetter, DeadLetterStore
from .errors import EnqueueError
from .vendors import VENDORS

#: Characters of the error shown per row in the table listing.
ERROR_WIDTH = 60


def _summary(e: DeadLetter) -> dict:
    return e.model_dump(exclude={"event", "request", "raw"})


def cmd_list(args: argparse.Namespace) -> int:
    entries = DeadLetterStore.default().list(args.vendor)
    if args.json:
        print(json.dumps([_summary(e) for e in entries], indent=2))
        return 0
    if not entries:
        print("no dead letters" + (f" for {args.vendor}" if args.vendor else ""))
        return 0
    print(f"{'ID':32}  {'VENDOR':11}  {'OPERATION':9}  {'REASON':17}  {'STATUS':6}  {'ATT':3}  {'FAILED AT':27}  ERROR")
    for e in entries:
        print(f"{e.id:32}  {e.vendor:11}  {e.operation or '-':9}  {e.reason:17}  {str(e.status or '-'):6}  "
              f"{e.attempts:<3}  {e.failed_at:27}  {e.error[:ERROR_WIDTH]}")
    print(f"{len(entries)} dead letter(s)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    entry = DeadLetterStore.default().get(args.id)
    if entry is None:
        print(f"no dead letter {args.id}", file=sys.stderr)
        return 1
    print(entry.model_dump_json(indent=2))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from .producer import publish

    store = DeadLetterStore.default()
    if args.all:
        entries = store.list(args.vendor)
    else:
        entries = []
        for entry_id in args.ids:
            entry = store.get(entry_id)
            if entry is None:
                print(f"no dead letter {entry_id}", file=sys.stderr)
                return 1
            if args.vendor is None or entry.vendor == args.vendor:
                entries.append(entry)
    replayed = skipped = 0
    for entry in entries:
        if not entry.replayable:
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
    print(f"{DeadLetterStore.default().purge(args.vendor)} dead letter(s) purged")
    return 0


def cmd_spool_status(args: argparse.Namespace) -> int:
    from .settings import get_settings
    from .spool import Spool

    s = get_settings()
    spool = Spool(s.spool_dir, s.spool_max_bytes)
    state = "on" if s.spool_enabled else "off (SPOOL_ENABLED=false)"
    print(f"spool {s.spool_dir} ({state}): {spool.pending()} event(s) waiting, "
          f"{spool.size()} of {s.spool_max_bytes} bytes")
    return 0


def cmd_spool_flush(args: argparse.Namespace) -> int:
    from .publisher import Publisher

    publisher = Publisher.default()
    if publisher.spool is None:
        print("the spool is off (SPOOL_ENABLED=false)", file=sys.stderr)
        return 1
    before = publisher.spool.pending()
    if not publisher.flush_once():
        print(f"stopped: broker unreachable; {publisher.spool.pending()} event(s) still waiting", file=sys.stderr)
        return 1
    print(f"{before} spooled event(s) published")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("deadletters", help="list, show, replay or purge dead letters")
    dsub = dl.add_subparsers(dest="action", required=True)
    vendor = {"choices": list(VENDORS), "help": "only this vendor's dead letters"}

    ls = dsub.add_parser("list", help="list dead letters, oldest first")
    ls.add_argument("--vendor", **vendor)
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.set_defaults(func=cmd_list)

    show = dsub.add_parser("show", help="print one dead letter in full")
    show.add_argument("id")
    show.set_defaults(func=cmd_show)

    rp = dsub.add_parser("replay", help="send dead letters to their vendor again")
    rp.add_argument("ids", nargs="*", metavar="ID")
    rp.add_argument("--all", action="store_true", help="every dead letter (of --vendor)")
    rp.add_argument("--vendor", **vendor)
    rp.set_defaults(func=cmd_replay)

    pg = dsub.add_parser("purge", help="delete dead letters for good")
    pg.add_argument("--vendor", **vendor)
    pg.set_defaults(func=cmd_purge)

    sp = sub.add_parser("spool", help="events a producer kept on local disk while Redis was unreachable")
    ssub = sp.add_subparsers(dest="action", required=True)
    ssub.add_parser("status", help="how many events wait in SPOOL_DIR").set_defaults(func=cmd_spool_status)
    ssub.add_parser("flush", help="publish them now").set_defaults(func=cmd_spool_flush)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "deadletters" and args.action == "replay" and bool(args.ids) == bool(args.all):
        p.error("replay takes dead letter IDs or --all (not both)")
    return args.func(args)
