"""Sandbox capacity: how many ConvertLoop events/s the sandbox answers to one client process.

Run as ``python -m tests.benchmarks.loadgen URL REQUESTS THREADS``; prints one JSON line
``{"requests": n, "seconds": s, "per_second": r, "statuses": {...}}``. One process with
``THREADS`` threads and one keep-alive connection each, like a worker process.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter

import httpx

from worker.sandbox import SANDBOX_CREDENTIALS, base_urls


def main(argv: list[str]) -> int:
    url, total, threads = argv[0], int(argv[1]), int(argv[2])
    target = base_urls(url)["convertloop"] + "/event_logs"
    auth = (SANDBOX_CREDENTIALS["CONVERTLOOP_APP_ID"], SANDBOX_CREDENTIALS["CONVERTLOOP_API_KEY"])
    body = {"name": "bench_event", "person": {"email": "cap@example.com"}, "metadata": {"plan": "pro"}}
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    remaining = [total]

    def take() -> bool:
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def loop() -> None:
        with httpx.Client(auth=auth, timeout=30) as client:
            while take():
                status = client.post(target, json=body).status_code
                with lock:
                    statuses[status] += 1

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    print(json.dumps({"requests": total, "seconds": seconds, "per_second": total / seconds,
                      "statuses": {str(k): v for k, v in statuses.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
