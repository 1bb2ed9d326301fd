"""The local spool: durable entries, a size bound, oldest-first draining, claims that survive crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from worker.producer.spool import Spool, SpoolFull


def test_entries_drain_oldest_first_and_are_removed(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    for i in range(5):
        spool.put(f"e{i}", [("loops", f"m{i}"), ("conveyour", f"c{i}")])
    assert spool.pending() == 5
    pushed = []
    assert spool.drain(pushed.append) == 5
    assert pushed == [[("loops", f"m{i}"), ("conveyour", f"c{i}")] for i in range(5)]
    assert spool.pending() == 0 and spool.size() == 0


def test_a_failed_push_keeps_the_entry_and_stops(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.put("e1", [("loops", "m1")])
    spool.put("e2", [("loops", "m2")])

    def broken(messages):
        raise ConnectionError("redis went away")

    with pytest.raises(ConnectionError):
        spool.drain(broken)
    assert spool.pending() == 2
    assert not [p for p in os.listdir(tmp_path) if ".claimed-" in p], "a failed push leaves no claim behind"
    pushed = []
    assert spool.drain(pushed.append) == 2


def test_full_spool_refuses_and_says_which_setting(tmp_path):
    spool = Spool(tmp_path, max_bytes=400)
    spool.put("e1", [("loops", "x" * 100)])
    with pytest.raises(SpoolFull, match="SPOOL_MAX_BYTES"):
        spool.put("e2", [("loops", "x" * 300)])
    assert spool.pending() == 1


def test_a_claim_by_a_dead_process_is_taken_back(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    path = spool.put("e1", [("loops", "m1")])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.rename(path, path.with_name(f"{path.name}.claimed-{int(dead.stdout)}"))
    pushed = []
    assert spool.drain(pushed.append) == 1
    assert pushed == [[("loops", "m1")]]


def test_a_claim_by_a_live_process_is_left_alone(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    path = spool.put("e1", [("loops", "m1")])
    os.rename(path, path.with_name(f"{path.name}.claimed-1"))  # pid 1 always exists
    assert spool.drain(lambda m: None) == 0
    assert spool.pending() == 1


def test_an_unreadable_entry_is_set_aside_not_lost(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    (tmp_path / "00000000000000000001-1-bad.json").write_text("{not json")
    spool.put("e1", [("loops", "m1")])
    pushed = []
    assert spool.drain(pushed.append) == 1
    assert (tmp_path / "00000000000000000001-1-bad.json.bad").exists()


def test_an_entry_is_written_whole(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    path = spool.put("e1", [("loops", "m1")])
    entry = json.loads(path.read_text())
    assert entry["event_id"] == "e1" and entry["messages"] == [["loops", "m1"]]
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _count_scans(monkeypatch) -> list[str]:
    import worker.producer.spool as spool_module

    scans: list[str] = []
    real = os.scandir

    def counting(path):
        scans.append(str(path))
        return real(path)

    monkeypatch.setattr(spool_module.os, "scandir", counting)
    return scans


def _on_disk(path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def test_a_call_reads_the_directory_only_for_the_first_figure(tmp_path, monkeypatch):
    # During an outage the spool holds thousands of files: summing them on every call's thread once a second
    # cost tens of ms a call (and held an event loop thread off the GIL). The figure is kept instead.
    spool = Spool(tmp_path, max_bytes=1 << 20)
    scans = _count_scans(monkeypatch)
    spool.put("e0", [("loops", "m0")])
    assert len(scans) == 1, "the first call sums what is there"
    for i in range(1, 40):
        spool.put(f"e{i}", [("loops", f"m{i}")])
    assert len(scans) == 1, "later calls add what they wrote"
    assert spool._size == _on_disk(tmp_path)
    assert spool.drain(lambda messages: None, limit=15) == 15
    assert spool._size == _on_disk(tmp_path), "what was published is taken off"


def test_what_another_process_spooled_is_seen_by_a_refresh_and_bounds_a_call(tmp_path, monkeypatch):
    import worker.producer.spool as spool_module

    ours, theirs = Spool(tmp_path, max_bytes=4000), Spool(tmp_path, max_bytes=10**9)
    ours.put("e0", [("loops", "m")])
    for i in range(30):
        theirs.put(f"t{i}", [("loops", "x" * 50)])
    assert ours._size < _on_disk(tmp_path)
    assert ours.refresh() is False, "summed less than SIZE_CACHE_SECONDS ago"
    assert ours.refresh(force=True) is True and ours._size == _on_disk(tmp_path)
    for i in range(30, 60):
        theirs.put(f"t{i}", [("loops", "x" * 50)])
    # Ours believes there is room; an entry that would not fit sums the directory again and is refused.
    monkeypatch.setattr(spool_module, "SIZE_CACHE_SECONDS", 0.0)
    with pytest.raises(SpoolFull):
        ours.put("e1", [("loops", "y" * 100)])
    assert ours._size == _on_disk(tmp_path)


def test_reading_a_large_spool_yields_the_gil(tmp_path, monkeypatch):
    import worker.producer.spool as spool_module

    for i in range(3 * spool_module.SCAN_CHUNK + 1):
        (tmp_path / f"{i:020d}-1-e{i}.json").write_bytes(b"{}")
    pauses = []
    monkeypatch.setattr(spool_module.time, "sleep", lambda s: pauses.append(s))
    spool = Spool(tmp_path, max_bytes=1 << 20)
    assert spool.pending() == 3 * spool_module.SCAN_CHUNK + 1
    assert pauses == [0, 0, 0]


def test_an_entry_spooled_while_the_directory_is_summed_is_not_missed(tmp_path, monkeypatch):
    # refresh() reads the directory without the lock: a call that spools meanwhile must still be counted, or
    # the bound could be passed by this process's own entries until the next sum.
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.put("e0", [("loops", "m0")])
    real_sum = spool._sum

    def sum_then_a_call_spools() -> int:
        total = real_sum()
        spool.put("e1", [("loops", "m1")])  # after the directory was read, before the figure is set
        return total

    monkeypatch.setattr(spool, "_sum", sum_then_a_call_spools)
    assert spool.refresh(force=True)
    assert spool._size >= _on_disk(tmp_path)
