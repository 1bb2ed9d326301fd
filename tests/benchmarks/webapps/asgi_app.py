"""A FastAPI handler awaiting the asyncio producer call (``/with``), the same handler without it
(``/without``), and the event loop's longest stall since the last look (``/lag``).

A ticker coroutine sleeps 1 ms at a time and records how much later than asked
it woke up: the longest the loop was kept from running it (a blocking call in a
handler shows there). On a machine busy with other work much of that is the loop's
thread waiting for a CPU, which the kernel counts (``/proc/.../schedstat``, time
spent runnable on a run queue): ``max_net_ms`` is the longest lateness less that
wait — what the process itself held the loop for (running, blocked on I/O or a
lock, waiting for the GIL). ``GET /lag`` returns and resets the figures. Example::

    uvicorn --port 8000 tests.benchmarks.webapps.asgi_app:app
    curl 'localhost:8000/with?n=1'      # {"event": "5f0c..."}
    curl localhost:8000/lag             # {"max_ms": 3.1, "max_net_ms": 1.1, "ticks": 812, "over_5ms": 0, ...}

``gc_max_ms`` and ``gc_full`` say how long the longest garbage collection took and how many were full ones:
a collection holds the GIL, so it stalls the loop whichever thread runs it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import worker

#: The ticker's sleep, seconds.
TICK = 0.001
#: A wake-up later than this many ms counts as a stall (the issue's bound).
STALL_MS = 5.0

_ZERO = {"max_ms": 0.0, "max_net_ms": 0.0, "ticks": 0, "over_5ms": 0, "over_5ms_net": 0, "gc_max_ms": 0.0,
         "gc_full": 0}
_lag = dict(_ZERO)
_gc_start = [0.0]


def _gc_timing(phase: str, info: dict) -> None:
    """The longest garbage collection (any thread holds the GIL for all of it) and the number of full ones."""
    if phase == "start":
        _gc_start[0] = time.perf_counter()
        return
    _lag["gc_max_ms"] = max(_lag["gc_max_ms"], (time.perf_counter() - _gc_start[0]) * 1000)
    _lag["gc_full"] += info.get("generation") == 2


gc.callbacks.append(_gc_timing)


def _runqueue_wait(fd: int | None) -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (0 where the kernel does not say)."""
    if fd is None:
        return 0.0
    return int(os.pread(fd, 128, 0).split()[1]) / 1e9


async def _ticker() -> None:
    try:
        fd: int | None = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
    except OSError:
        fd = None
    clock = time.perf_counter
    while True:
        t0, w0 = clock(), _runqueue_wait(fd)
        await asyncio.sleep(TICK)
        late = (clock() - t0 - TICK) * 1000
        net = late - (_runqueue_wait(fd) - w0) * 1000
        _lag["ticks"] += 1
        _lag["max_ms"] = max(_lag["max_ms"], late)
        _lag["max_net_ms"] = max(_lag["max_net_ms"], net)
        _lag["over_5ms"] += late > STALL_MS
        _lag["over_5ms_net"] += net > STALL_MS


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(_ticker())
    yield
    task.cancel()


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


@app.get("/with")
async def with_api(n: int = 0) -> dict:
    event_id = await worker.aio.track("bench_signup", email=f"u{n}@example.com", properties={"plan": "pro", "n": n})
    return {"event": event_id}


@app.get("/without")
async def without_api(n: int = 0) -> dict:
    return {"event": None, "n": n}


@app.get("/lag")
async def lag() -> dict:
    out = dict(_lag)
    _lag.update(_ZERO)
    return out
