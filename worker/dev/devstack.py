"""``python -m worker.devstack -- COMMAND ...``: run your web app against a private stack on this machine.

Starts a private ``redis-server``, the vendor sandbox and one Celery worker,
runs COMMAND (your app's server) with their settings in its environment —
``REDIS_URL``, the sandbox's ``*_BASE_URL``s and credentials, ``LOOPS_MAILING_LISTS``
(``vip``, ``trial``), a spool directory of its own, and ``SANDBOX_URL`` — and
prints each request the vendors receive as it arrives. When COMMAND exits (or on
Ctrl-C) it stops everything and exits with COMMAND's status. Vendor variables
of your shell are never passed on: no real vendor is ever called.

Example::

    $ python -m worker.devstack -- gunicorn --chdir examples/flask_app -b 127.0.0.1:8000 app:app
    redis    redis://127.0.0.1:40211/0  (private redis-server)
    sandbox  http://127.0.0.1:40212
    worker   celery -A worker worker  (log: /tmp/vdw-dev-x1y2/dev.log)
    ...
    vendor   loops PUT /contacts/update -> 200  (jill@acme.co)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..sandbox import SandboxClient

#: Mailing lists the sandbox's Loops knows, by segment name.
DEV_MAILING_LISTS = {"vip": "list_vip", "trial": "list_trial"}
#: Seconds between looks at what the sandbox received.
WATCH_INTERVAL = 0.2


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(command: list[str], quiet: bool = False) -> int:
    from ..sandbox import Sandbox, SandboxClient
    from .localstack import RedisServer, WorkerProcess, sandbox_env, terminate

    log_dir = tempfile.mkdtemp(prefix="vdw-dev-")
    redis_server = RedisServer().start()
    sandbox = worker = app = None
    stop_watching = threading.Event()
    try:
        sandbox = Sandbox(port=0).start()
        env = sandbox_env(redis_server.url, sandbox.base_urls, LOOPS_MAILING_LISTS=json.dumps(DEV_MAILING_LISTS),
                          SPOOL_DIR=os.path.join(log_dir, "spool"), SANDBOX_URL=sandbox.url)
        _say(f"redis    {redis_server.url}  (private redis-server)")
        _say(f"sandbox  {sandbox.url}")
        worker = WorkerProcess(env, "dev", log_dir=log_dir).start()
        _say(f"worker   celery -A worker worker  (log: {worker.log_path})")
        if not quiet:
            threading.Thread(target=_watch, args=(SandboxClient(sandbox.url), stop_watching), daemon=True).start()
        _say(f"running  {' '.join(command)}")
        app = subprocess.Popen(command, env=env)
        return app.wait()
    except KeyboardInterrupt:  # Ctrl-C reached COMMAND too (same process group): let it finish
        if app is not None:
            terminate(app)
        return 130
    finally:
        stop_watching.set()
        if app is not None:
            terminate(app)
        if worker is not None:
            worker.stop()
        if sandbox is not None:
            sandbox.stop()
        redis_server.stop()
        _say("stopped  redis, sandbox and worker")


def _watch(client: SandboxClient, stop: threading.Event) -> None:
    """Print each vendor request as the sandbox records it."""
    seen = 0
    while not stop.wait(WATCH_INTERVAL):
        try:
            records = client.requests(since=seen)
        except Exception:  # noqa: BLE001 - the sandbox is stopping
            return
        for record in records:
            if record["status"] is None:  # still being answered: next round
                break
            seen = record["seq"]
            _say(f"vendor   {record['vendor']} {record['method']} {record['path']} -> {record['status']}"
                 f"  ({', '.join(sorted(_people(record['body'])))})")


def _people(body: object) -> set[str]:
    bodies = body if isinstance(body, list) else [body]
    out = set()
    for b in bodies:
        if isinstance(b, dict):
            person = b.get("person")
            if not isinstance(person, dict):
                person = b
            out |= {str(person[k]) for k in ("email", "id", "userId", "user_id") if person.get(k)}
    return out


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.devstack", description=__doc__.splitlines()[0])
    p.add_argument("--quiet", action="store_true", help="do not print the requests the vendors receive")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --, e.g. -- gunicorn app:app")
    signal.signal(signal.SIGTERM, _interrupt)  # stop like on Ctrl-C: COMMAND first, then the stack
    return run(command, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
