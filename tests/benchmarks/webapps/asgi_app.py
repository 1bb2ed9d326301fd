"""A FastAPI handler awaiting the asyncio producer call (``/with``), the same handler without it
(``/without``), and the event loop's longest stall since the last look (``/lag``).

A ticker coroutine sleeps 1 ms at a time and records how much later than asked
it woke up: the longest the loop was kept from running it (a blocking call in a
handler shows there). ``GET /lag`` returns and resets the figures. Example::

    uvicorn --port 8000 tests.benchmarks.webapps.asgi_app:app
    curl 'localhost:8000/with?n=1'      # {"event": "5f0c..."}
    curl localhost:8000/lag             # {"max_ms": 1.1, "ticks": 812, "over_5ms": 0}
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import worker

#: The ticker's sleep, seconds.
TICK = 0.001
#: A wake-up later than this many ms counts as a stall (the issue's bound).
STALL_MS = 5.0

_lag = {"max_ms": 0.0, "ticks": 0, "over_5ms": 0}


async def _ticker() -> None:
    clock = time.perf_counter
    while True:
        t0 = clock()
        await asyncio.sleep(TICK)
        late = (clock() - t0 - TICK) * 1000
        _lag["ticks"] += 1
        if late > _lag["max_ms"]:
            _lag["max_ms"] = late
        if late > STALL_MS:
            _lag["over_5ms"] += 1


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
    _lag.update(max_ms=0.0, ticks=0, over_5ms=0)
    return out
