"""Command line: ``python -m worker.sandbox [--host HOST] [--port PORT]``.

Prints ``sandbox listening on http://HOST:PORT`` followed by one line per
vendor base URL, then serves until SIGTERM or SIGINT.

Example::

    $ python -m worker.sandbox --port 0
    sandbox listening on http://127.0.0.1:40213
      convertloop: http://127.0.0.1:40213/convertloop/v1
      loops: http://127.0.0.1:40213/loops/api/v1
      conveyour: http://127.0.0.1:40213/conveyour/api
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from .server import DEFAULT_HOST, Sandbox

# Port used when --port is not given (0 picks a free port).
DEFAULT_PORT = 8900


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker.sandbox",
        description="Serve fake ConvertLoop, Loops and ConveYour APIs.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"interface to bind (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to bind, 0 = any free port (default {DEFAULT_PORT})"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    sandbox = Sandbox(host=args.host, port=args.port).start()
    try:
        print(f"sandbox listening on {sandbox.url}")
        for vendor, url in sandbox.base_urls.items():
            print(f"  {vendor}: {url}")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
