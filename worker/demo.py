"""``python -m worker.demo``: the whole product on this machine, with sample traffic.

It starts a private ``redis-server`` (or uses ``REDIS_URL`` with ``--redis-url``),
the vendor sandbox, a Celery worker and Flower, then sends traffic that shows a
delivery to every vendor, a retry (a 503 from Loops, then success) and a dead
letter (a 422 from ConveYour), and prints what happened. It runs until Ctrl-C,
or for ``--exit-after`` seconds.

Example::

    $ python -m worker.demo --exit-after 0     # show the outcome, then stop
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

#: Where Flower listens by default.
DEFAULT_FLOWER_PORT = 5555
#: Flower's demo login (it only listens on loopback).
FLOWER_LOGIN = "demo:demo"
#: Mailing lists the demo maps segment names to.
DEMO_MAILING_LISTS = {"vip": "list_vip", "trial": "list_trial"}


def _env(redis_url: str, urls: dict[str, str]) -> dict[str, str]:
    from .localstack import sandbox_env

    return sandbox_env(
        redis_url, urls,
        LOOPS_MAILING_LISTS=json.dumps(DEMO_MAILING_LISTS),
        RETRY_BACKOFF_BASE="0.5",
        RETRY_BACKOFF_MAX="5",
        RETRY_MAX_ATTEMPTS="5",
        KEY_PREFIX="vdw-demo",
    )


def _say(text: str) -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    from . import clients
    from .localstack import FlowerProcess, RedisServer, WorkerProcess, wait_until
    from .sandbox import Sandbox, SandboxClient
    from .settings import get_settings

    log_dir = tempfile.mkdtemp(prefix="vdw-demo-")
    redis_server = None
    if args.redis_url:
        redis_url = args.redis_url
    else:
        redis_server = RedisServer().start()
        redis_url = redis_server.url
    sandbox = Sandbox(port=args.sandbox_port).start()
    env = _env(redis_url, sandbox.base_urls)
    os.environ.update(env)
    get_settings.cache_clear()
    clients.reset()
    worker = flower = None
    try:
        _say(f"redis    {redis_url}" + ("  (private redis-server)" if redis_server else ""))
        _say(f"sandbox  {sandbox.url}")
        worker = WorkerProcess(env, "demo", log_dir=log_dir).start()
        _say(f"worker   celery -A worker worker   (log: {worker.log_path})")
        flower = FlowerProcess(env, os.path.join(log_dir, "flower.log"), args.flower_port or None, FLOWER_LOGIN)
        _say(f"flower   {flower.url}   (login {FLOWER_LOGIN})")
        flower.start()

        import worker as product

        box = SandboxClient(sandbox.url)
        _say("\nsending sample traffic ...")
        product.identify(email="jill@acme.co", user_id="jill", traits={"first_name": "Jill", "plan": "pro"})
        product.segment(email="jill@acme.co", user_id="jill", add=["vip"], remove=["trial"])
        sale = product.track("made_sale", email="jill@acme.co", user_id="jill", properties={"amount": 1000})
        # ConveYour may get the identify and the segment in one bulk request: count calls, not requests.
        wait_until(lambda: sum(len(r["body"]) if isinstance(r["body"], list) else 1
                               for r in box.requests(vendor="conveyour", status=200)) >= 3,
                   timeout=20, message="deliveries")

        box.configure("loops", fail_next=[503])
        retried = product.track("upgraded", email="jill@acme.co", properties={"plan": "team"}, vendors=["loops"])
        box.configure("conveyour", fail_next=[{"status": 422, "body": {"error": "field 'seats' is not a number"}}])
        rejected = product.identify(user_id="jack", traits={"seats": "many"}, vendors=["conveyour"])
        box.wait_for(lambda r: r.get("idempotency_key") == retried, vendor="loops", status=200, timeout=30)
        from .cli import main as cli

        wait_until(lambda: _dead_letter_for(rejected), timeout=20, message="the dead letter")

        _say(f"\ndelivered: event {sale} to every vendor:")
        for vendor, stats in box.stats()["vendors"].items():
            _say(f"  {vendor:12} {stats['by_status']}")
        _say(f"retried:   event {retried} to loops: answered 503, then delivered on attempt 2")
        _say(f"dead letter: event {rejected} to conveyour (422):\n")
        cli(["deadletters", "list"])
        _say("\nreplay it with:  python -m worker deadletters replay --all --vendor conveyour"
             f"   (with REDIS_URL={redis_url} KEY_PREFIX={env['KEY_PREFIX']})")
        _say(f"Flower shows the dead letter as FAILURE (DeadLettered) and the retry (RETRY, then SUCCESS): "
             f"{flower.url}/tasks")
        if args.exit_after is None:
            _say("\nrunning; Ctrl-C to stop")
            while True:
                time.sleep(3600)
        else:
            time.sleep(args.exit_after)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        _say("stopping ...")
        if flower is not None:
            flower.stop()
        if worker is not None:
            worker.stop()
        sandbox.stop()
        if redis_server is not None:
            redis_server.stop()


def _dead_letter_for(event_id: str) -> bool:
    from .deadletters import DeadLetterStore

    return any(d.event_id == event_id for d in DeadLetterStore.default().list())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.demo", description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", help="use this Redis instead of starting a private redis-server")
    p.add_argument("--flower-port", type=int, default=DEFAULT_FLOWER_PORT, help="0 picks a free port")
    p.add_argument("--sandbox-port", type=int, default=0)
    p.add_argument("--exit-after", type=float, default=None, metavar="SECONDS",
                   help="stop this long after the traffic was shown (default: run until Ctrl-C)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
