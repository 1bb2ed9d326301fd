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
