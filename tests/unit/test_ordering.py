"""Per-person order: the producer's writes, the turn, parking and the sweep (worker/delivery/ordering.py) on real Redis;
merging (worker/events.py) and merged requests (worker/vendors)."""

from __future__ import annotations

import json
import threading

import pytest

from worker.delivery import ordering
from worker.delivery.ordering import CLAIMED, DONE, PARKED, PersonLog
from worker.envelope import TaskMessages
from worker.events import IdentifyEvent, Identity, SegmentEvent, TrackEvent, merge
from worker.keys import HEADER, order_commands, person_id
from worker.producer.publisher import ordered, wire
from worker.settings import Settings
from worker.vendors import VENDORS

P = person_id("email:jill@acme.co")


def queue_calls(client, prefix: str, vendor: str, person: str, ids: list[str]) -> None:
    for task_id in ids:
        for command in order_commands(prefix, vendor, person, task_id, json.dumps({"id": task_id})):
            client.execute_command(*command)


@pytest.fixture
def log(client, prefix):
    return PersonLog(client, prefix, "loops", queue=f"{prefix}-queue")


def test_the_first_claim_takes_the_turn_and_reads_the_pending_calls_in_order(client, prefix, log):
    queue_calls(client, prefix, "loops", P, ["e1", "e2", "e3"])
    turn = log.claim(P, "e2", lease=30)
    assert turn.state == CLAIMED
    assert [e.task_id for e in turn.entries] == ["e1", "e2", "e3"]
    assert json.loads(turn.entries[0].event_json) == {"id": "e1"}


def test_a_second_claim_while_the_turn_is_held_is_busy_then_parked_with_its_record_acknowledged(client, prefix,
                                                                                               log):
    queue_calls(client, prefix, "loops", P, ["e1", "e2"])
    assert log.claim(P, "e1", lease=30).state == CLAIMED
    assert log.claim(P, "e2", lease=30).state == ordering.BUSY
    client.hset("unacked", "tag-2", "[record]")
    client.zadd("unacked_index", {"tag-2": 1.0})
    try:
        parked = log.park(P, "e2", 30, "message-2", "tag-2")
        assert parked.state == PARKED and parked.holder == "e1"
        assert not client.hexists("unacked", "tag-2") and client.zscore("unacked_index", "tag-2") is None
        assert log.held_people() == 1
        # The holder delivers both and gives the turn up: the parked message goes to the front of the queue.
        released = log.finish(P, "e1", done=["e1", "e2"])
        assert released.state == "released" and released.unparked == 1
        assert client.lrange(f"{prefix}-queue", 0, -1) == [b"message-2"]
        assert log.held_people() == 0 and log.pending() == 0
        assert log.claim(P, "e2", lease=30).state == DONE
    finally:
        client.delete("unacked", "unacked_index")


def test_the_holder_may_claim_again_and_another_task_may_after_the_turn_is_given_up(client, prefix, log):
    queue_calls(client, prefix, "loops", P, ["e1", "e2"])
    assert log.claim(P, "e1", lease=30).state == CLAIMED
    assert log.claim(P, "e1", lease=30).state == CLAIMED  # a redelivered message of the holder
    log.finish(P, "e1")  # gave up without delivering anything
    turn = log.claim(P, "e2", lease=30)
    assert turn.state == CLAIMED and [e.task_id for e in turn.entries] == ["e1", "e2"]


def test_finish_going_on_keeps_the_turn_for_what_is_left(client, prefix, log):
    queue_calls(client, prefix, "loops", P, ["e1", "e2", "e3"])
    log.claim(P, "e1", lease=30)
    nxt = log.finish(P, "e1", done=["e1"], go_on=True, lease=30)
    assert nxt.state == CLAIMED and [e.task_id for e in nxt.entries] == ["e2", "e3"]
    assert log.claim(P, "e3", lease=30).state == ordering.BUSY
    assert log.finish(P, "e1", done=["e2", "e3"], go_on=True, lease=30).state == "released"


def test_a_dead_lettered_call_tells_its_own_message_how_it_ended(client, prefix, log):
    queue_calls(client, prefix, "loops", P, ["e1", "e2"])
    log.claim(P, "e1", lease=30)
    log.finish(P, "e1", done=["e1", "e2"], dead={"e2": "rejected|422|dl-1"})
    assert log.claim(P, "e2", lease=30).outcome == "rejected|422|dl-1"
    assert log.claim(P, "e2", lease=30).outcome == ""  # told once


def test_the_lease_runs_out_and_the_sweep_unparks_a_person_nobody_holds(client, prefix, log):
    queue_calls(client, prefix, "loops", P, ["e1", "e2"])
    log.claim(P, "e1", lease=0.05)
    assert log.park(P, "e2", 30, "message-2", None).state == PARKED
    assert log.sweep(older_than=3600) == 0  # parked too recently
    client.delete(f"{prefix}:order:loops:turn:{P}")  # as if the lease ran out
    assert log.sweep(older_than=0) == 1
    assert client.lrange(f"{prefix}-queue", 0, -1) == [b"message-2"]
    assert log.held_people() == 0


def test_a_flood_of_parked_messages_goes_back_a_bounded_step_at_a_time(client, prefix, log):
    n = ordering.UNPARK_MAX + 7
    queue_calls(client, prefix, "loops", P, ["holder", *(f"e{i}" for i in range(n))])
    log.claim(P, "holder", lease=30)
    for i in range(n):
        log.park(P, f"e{i}", 30, f"m{i}", None)
    assert log.finish(P, "holder", done=["holder"]).unparked == ordering.UNPARK_MAX
    assert log.held_people() == 1
    assert log.sweep(older_than=1) == 1
    assert client.llen(f"{prefix}-queue") == n and log.held_people() == 0


def test_only_one_of_many_threads_takes_the_turn(redis_server, prefix):
    import redis

    ids = [f"e{i}" for i in range(16)]
    c = redis.Redis.from_url(redis_server.url)
    queue_calls(c, prefix, "loops", P, ids)
    results: list[str] = []
    barrier = threading.Barrier(len(ids))

    def take(task_id: str) -> None:
        log = PersonLog(redis.Redis.from_url(redis_server.url), prefix, "loops")
        barrier.wait()
        results.append(log.claim(P, task_id, lease=30).state)

    threads = [threading.Thread(target=take, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted([CLAIMED] + [ordering.BUSY] * (len(ids) - 1))


def test_the_producer_queues_a_call_and_its_place_in_one_multi(client, prefix):

    payload = {"id": "ev1", "operation": "identify", "created_at": "2026-01-01T00:00:00Z",
               "identity": {"email": "jill@acme.co"}, "traits": {"plan": "pro"}}
    messages = ordered(TaskMessages(), payload, ["loops", "conveyour"], prefix)
    queues = [m for m in messages if m[0]]
    assert [q for q, _ in queues] == ["loops", "conveyour"]
    headers = [json.loads(m)["headers"][HEADER] for _, m in queues]
    assert headers == [person_id("email:jill@acme.co"), person_id("id:jill@acme.co")]
    data, replies = wire(messages)
    assert data.startswith(b"*1\r\n$5\r\nMULTI\r\n") and data.endswith(b"*1\r\n$4\r\nEXEC\r\n")
    assert replies == len(messages) + 2
    assert wire(queues)[1] == 2 and b"MULTI" not in wire(queues)[0]


# -- merging --------------------------------------------------------------------------------------------------

def _who() -> Identity:
    return Identity(email="jill@acme.co")


def identify(i: str, **traits) -> IdentifyEvent:
    return IdentifyEvent(id=i, created_at="2026-01-01T00:00:00Z", identity=_who(), traits=traits)


def segment(i: str, add=(), remove=()) -> SegmentEvent:
    return SegmentEvent(id=i, created_at="2026-01-01T00:00:00Z", identity=_who(), add=list(add), remove=list(remove))


def test_a_merge_equals_the_calls_applied_in_order():
    u = merge([identify("1", plan="old", company="Acme"), segment("2", add=["vip"]), identify("3", plan="new"),
               segment("4", remove=["vip"], add=["trial"]), segment("5", add=["vip"])])
    assert u.traits == {"plan": "new", "company": "Acme"}
    assert sorted(u.add) == ["trial", "vip"] and u.remove == []
    assert u.id == "5"


@pytest.mark.parametrize(("vendor", "expected"), [
    ("convertloop", ("POST", "/people", {"plan": "new", "company": "Acme", "email": "jill@acme.co",
                                         "remove_from_segments": ["vip"]})),
    ("loops", ("PUT", "/contacts/update", {"plan": "new", "company": "Acme", "email": "jill@acme.co",
                                           "mailingLists": {"list_vip": False}})),
    ("conveyour", ("POST", "/analytics/identify", {"id": "jill@acme.co", "traits": {
        "plan": "new", "company": "Acme", "tags": {"add": [], "remove": ["vip"]}}})),
])
def test_a_merged_update_is_one_identify_shaped_request(vendor, expected):
    u = merge([identify("1", plan="old", company="Acme"), segment("2", add=["vip"]), identify("3", plan="new"),
               segment("4", remove=["vip"])])
    request = VENDORS[vendor].build(u, Settings(loops_mailing_lists={"vip": "list_vip"}))
    assert (request.method, request.path, request.json) == expected


def test_what_is_never_merged():
    track = TrackEvent(id="t", created_at="2026-01-01T00:00:00Z", identity=_who(), event="x")
    for vendor in VENDORS.values():
        assert not vendor.mergeable(track)
        assert vendor.mergeable(identify("1", plan="x")) and vendor.mergeable(segment("2", add=["a"]))
    assert not VENDORS["conveyour"].mergeable(identify("1", counter={"$inc": 1}))
    assert not VENDORS["conveyour"].mergeable(identify("1", tags=["a"]))
    assert not VENDORS["convertloop"].mergeable(identify("1", add_to_segments="a"))
    assert not VENDORS["loops"].mergeable(identify("1", mailingLists={}))


def test_who_is_one_person_at_each_vendor():
    both = {"email": "j@a.co", "user_id": "42"}
    assert VENDORS["convertloop"].person_key(both) == "email:j@a.co"
    assert VENDORS["loops"].person_key(both) == "email:j@a.co"
    assert VENDORS["conveyour"].person_key(both) == "id:42"
    assert VENDORS["convertloop"].person_key({"pid": "p1"}) == "pid:p1"
    assert VENDORS["loops"].person_key({"pid": "p1"}) is None
