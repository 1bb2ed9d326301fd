"""The dead-letter store's counts by vendor and reason: kept in the same script as every add and remove, recounted
once for a store older than them (or written to behind their back), read in one round trip."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from worker.delivery.deadletters import DeadLetter, DeadLetterStore, _decode_counts


@pytest.fixture
def store(client, prefix) -> DeadLetterStore:
    return DeadLetterStore(client, prefix)


def dead(vendor: str = "loops", reason: str = "rejected", **extra) -> DeadLetter:
    return DeadLetter(vendor=vendor, operation="track", reason=reason, attempts=1, event_id="e", **extra)


def listed(store: DeadLetterStore) -> dict[str, dict[str, int]]:
    """What the counts must say, the slow way: every entry read."""
    out: dict[str, Counter[str]] = {}
    for e in store.list():
        out.setdefault(e.vendor, Counter())[e.reason] += 1
    return {vendor: dict(c) for vendor, c in out.items()}


def kept(store: DeadLetterStore) -> dict[str, dict[str, int]] | None:
    """The counts as the store's scripts kept them, read as they are (no recount)."""
    return _decode_counts(store.client.hgetall(store.counts_key))


def calls(client) -> Counter[str]:
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in client.info("commandstats").items()})


def test_add_remove_and_purge_keep_the_counts(store):
    assert store.counts() == {} == kept(store)  # a new store: counted (nothing) once, complete from then on
    a = store.add(dead("loops", "rejected"))
    store.add(dead("loops", "rejected"))
    store.add(dead("loops", "retries_exhausted"))
    c = store.add(dead("conveyour", "property_cap"))
    assert kept(store) == {"loops": {"rejected": 2, "retries_exhausted": 1}, "conveyour": {"property_cap": 1}}
    assert store.remove(a.id) and not store.remove(a.id) and not store.remove("no-such-id")
    assert kept(store) == {"loops": {"rejected": 1, "retries_exhausted": 1}, "conveyour": {"property_cap": 1}}
    assert store.remove(c.id)
    assert kept(store) == {"loops": {"rejected": 1, "retries_exhausted": 1}}  # none left: the vendor is gone
    assert store.counts() == kept(store) == listed(store)
    assert store.purge("loops") == 2
    assert kept(store) == {} == listed(store)
    assert store.recount(force=False) is None  # they always added up: nothing to recount


def test_storing_an_id_again_replaces_its_count(store):
    store.counts()
    first = store.add(dead("loops", "rejected"))
    store.add(dead("convertloop", "malformed", id=first.id))
    assert kept(store) == {"convertloop": {"malformed": 1}} and store.count() == 1


def test_a_store_without_counts_is_recounted_once_then_read_in_one_round_trip(store, client):
    for vendor, reason in [("loops", "rejected")] * 3 + [("conveyour", "malformed"), ("unknown-thing", "rejected")]:
        entry = dead(vendor, reason)
        client.hset(store.hash_key, entry.id, entry.model_dump_json())  # as the store wrote them before the counts
        client.zadd(store.index_key, {entry.id: 1.0})
    client.hset(store.hash_key, "garbage", "not json")  # never a valid entry, still counted, never in the way
    expected = {"loops": {"rejected": 3}, "conveyour": {"malformed": 1}, "unknown-thing": {"rejected": 1},
                "?": {"?": 1}}
    assert store.counts() == expected
    before = calls(client)
    assert store.counts() == expected
    spent = calls(client) - before
    spent.pop("info", None)
    assert spent == Counter({"evalsha": 1, "hgetall": 1, "hlen": 1}), spent
    assert store.recount(force=False) is None and store.recount() == 6


def test_entries_written_behind_the_counts_back_are_noticed_and_recounted(store, client):
    store.add(dead("loops", "rejected"))
    assert store.counts() == {"loops": {"rejected": 1}}
    sneaky = dead("loops", "request_error")
    client.hset(store.hash_key, sneaky.id, sneaky.model_dump_json())  # e.g. an older worker during an upgrade
    client.zadd(store.index_key, {sneaky.id: 2.0})
    assert store.counts() == {"loops": {"rejected": 1, "request_error": 1}}
    client.hdel(store.hash_key, sneaky.id)  # and removed the same way
    client.zrem(store.index_key, sneaky.id)
    assert store.counts() == {"loops": {"rejected": 1}}


def test_concurrent_adds_and_removes_leave_exact_counts(store):
    ids: list[str] = []
    lock = threading.Lock()

    def add(vendor: str) -> None:
        for i in range(100):
            entry = store.add(dead(vendor, ("rejected", "malformed", "property_cap")[i % 3]))
            with lock:
                ids.append(entry.id)

    def remove() -> None:
        for _ in range(150):
            with lock:
                victim = ids.pop() if ids else None
            if victim:
                store.remove(victim)

    store.counts()
    threads = [threading.Thread(target=add, args=(v,)) for v in ("loops", "conveyour", "convertloop")]
    threads += [threading.Thread(target=remove) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = kept(store)
    assert counts == listed(store) and counts is not None
    assert sum(n for per in counts.values() for n in per.values()) == store.count() == len(ids)
