"""python -m worker status and retries release, as an operator runs them (subprocesses). No worker runs in
this module: one would probe the open breaker set up here, close it and release the retries itself."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from .test_cli import entry

pytestmark = pytest.mark.integration


def test_status_shows_waiting_retries_breaker_and_dead_letters_and_release_makes_them_due(store, product_env,
                                                                                          unique_email):
    import redis

    from worker.envelope import TaskMessages
    from worker.retries.attempts import RetryState
    from worker.retries.breaker import Breaker
    from worker.retries.schedule import RetrySchedule

    r = redis.Redis.from_url(product_env["REDIS_URL"])
    r.delete("loops", "vdw:retries:loops", "vdw:breaker:loops")
    schedule, messages = RetrySchedule(r, "vdw"), TaskMessages()
    scheduled = time.time()  # the retries are due 120, 300 and 900 s after a moment after this one
    for i, delay in enumerate((120, 300, 900)):
        event = {"id": f"st{i}", "operation": "identify", "created_at": "2026-01-01T00:00:00Z",
                 "identity": {"email": f"{i}-{unique_email}"}, "traits": {}}
        schedule.add("loops", messages.retry("loops", event, f"st{i}.loops", 1, RetryState(1, 1.0).header()), delay)
    breaker = Breaker(r, "vdw", threshold=2)
    breaker.record("loops", ok=False)
    breaker.record("loops", ok=False)
    store.add(entry("loops", unique_email))
    try:
        out = subprocess.run([sys.executable, "-m", "worker", "status", "--json"], env=product_env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        asked = time.time()  # the CLI looked at a moment before this one
        loops = json.loads(out.stdout)["vendors"]["loops"]
        # The earliest retry, due 120 s after it was scheduled, as seen at some moment of the CLI's run (shown
        # to 0.1 s): no bound on how long the CLI took, only what the two clock readings around it allow.
        assert loops["retries_waiting"] == 3
        assert 120 - (asked - scheduled) - 0.05 <= loops["next_retry_in"] <= 120 + 0.05, \
            (loops["next_retry_in"], asked - scheduled)
        assert loops["breaker"] == "open" and loops["breaker_since"] and loops["failures_in_a_row"] == 2
        assert loops["dead_letters"] == {"rejected": 1} and loops["queued"] == 0
        table = subprocess.run([sys.executable, "-m", "worker", "status"], env=product_env,
                               capture_output=True, text=True, timeout=60).stdout
        assert "loops" in table and "open since" in table and "rejected 1" in table

        out = subprocess.run([sys.executable, "-m", "worker", "retries", "release", "--vendor", "loops"],
                             env=product_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "loops: 3 waiting retries released" in out.stdout
        assert r.llen("loops") == 3 and schedule.waiting("loops").count == 0
        assert {json.loads(m)["headers"]["id"] for m in r.lrange("loops", 0, -1)} == {"st0.loops", "st1.loops",
                                                                                      "st2.loops"}
    finally:
        r.delete("loops", "vdw:retries:loops", "vdw:breaker:loops")


def _commands(client) -> Counter[str]:
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in client.info("commandstats").items()})


def _sent(client) -> int:
    """Bytes Redis has written to its clients so far."""
    return int(client.info("stats")["total_net_output_bytes"])


def test_status_and_a_scrape_cost_the_same_redis_work_with_100000_dead_letters_as_with_one(store, product_env,
                                                                                          unique_email, capsys):
    """The dead-letter counts come from the counts hash, not from reading every entry: the same Redis commands,
    and the same bytes from Redis, whatever the number of dead letters (INFO commandstats and stats; nothing
    else uses this Redis in this module). Reading every entry was one ZRANGE and one HMGET too -- the bytes tell."""
    import redis
    from prometheus_client import generate_latest

    from worker.ops.cli import main
    from worker.ops.export import registry
    from worker.ops.status import vendor_status

    r = redis.Redis.from_url(product_env["REDIS_URL"])
    keys = (store.hash_key, store.index_key, store.counts_key)
    r.delete(*keys)
    reg = registry()

    took: dict[tuple[str, int], float] = {}

    def cost(action, name: str = "", n: int = 0) -> tuple[Counter[str], int]:
        before, sent = _commands(r), _sent(r)
        started = time.perf_counter()
        action()
        took[name, n] = time.perf_counter() - started
        spent, read = _commands(r) - before, _sent(r) - sent
        spent.pop("info", None)  # our own counting
        return spent, read

    def status_table() -> None:
        assert main(["status"]) == 0

    actions = {"status": vendor_status, "status table": status_table, "scrape": lambda: generate_latest(reg)}
    try:
        store.add(entry("loops", unique_email))
        for action in actions.values():
            action()  # warm up: scripts loaded, connections made
        one = {name: cost(action, name, 1) for name, action in actions.items()}

        n = 100_000
        expected: dict[str, Counter[str]] = {"loops": Counter({"rejected": 1})}
        pipe = r.pipeline(transaction=False)
        for i in range(n):  # through the store's own add script, pipelined: the counts are kept as workers keep them
            vendor, reason = "loops" if i % 4 else "conveyour", "rejected" if i % 3 else "retries_exhausted"
            expected.setdefault(vendor, Counter())[reason] += 1
            e = entry(vendor, f"{i}-{unique_email}", reason=reason)
            store._add(keys=list(keys), args=[e.id, e.model_dump_json(), str(i)], client=pipe)
            if i % 2000 == 1999:
                pipe.execute()
        pipe.execute()
        assert r.hlen(store.hash_key) == n + 1

        many = {name: cost(action, name, n + 1) for name, action in actions.items()}
        status = vendor_status()
        r.delete(store.counts_key)  # as a store from before the counts: recounted once, in one script
        started = time.perf_counter()
        assert store.counts() == {v: dict(c) for v, c in expected.items()}
        recount = time.perf_counter() - started
    finally:
        r.delete(*keys)
    capsys.readouterr()
    with capsys.disabled():
        for name in actions:
            (c1, b1), (cn, bn) = one[name], many[name]
            print(f"\n{name}: {sum(c1.values())} Redis commands, {b1} bytes from Redis, "
                  f"{took[name, 1] * 1000:.1f} ms with 1 dead letter; {sum(cn.values())}, {bn} bytes, "
                  f"{took[name, n + 1] * 1000:.1f} ms with {n + 1}: {dict(cn)}")
        print(f"recount of {n + 1} dead letters from scratch (a store older than the counts): {recount * 1000:.0f} ms")
    for name in actions:
        (c1, b1), (cn, bn) = one[name], many[name]
        assert cn == c1, f"{name}: the Redis commands change with the number of dead letters"
        assert bn - b1 < 4096, f"{name}: {bn - b1} more bytes from Redis with {n} more dead letters"
    assert status["vendors"]["loops"]["dead_letters"] == dict(expected["loops"])
    assert status["vendors"]["conveyour"]["dead_letters"] == dict(expected["conveyour"])
    assert status["vendors"]["convertloop"]["dead_letters"] == {}


def test_deadletters_recount_counts_a_store_from_before_the_counts(store, product_env, unique_email):
    import redis

    r = redis.Redis.from_url(product_env["REDIS_URL"])
    for vendor in ("loops", "loops", "conveyour"):
        e = entry(vendor, f"{vendor}-{len(store.list())}-{unique_email}")
        r.hset(store.hash_key, e.id, e.model_dump_json())  # as the store wrote them before the counts
        r.zadd(store.index_key, {e.id: 1.0})
    r.delete(store.counts_key)
    out = subprocess.run([sys.executable, "-m", "worker", "deadletters", "recount"], env=product_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3 dead letter(s) counted (conveyour: rejected 1; loops: rejected 2)"
    assert store.counts() == {"loops": {"rejected": 2}, "conveyour": {"rejected": 1}}
