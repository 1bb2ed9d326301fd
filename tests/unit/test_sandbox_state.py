"""The sandbox's final state per vendor and person (``/_sandbox/state``), driven through
`SandboxApp.dispatch` (the whole vendor pipeline without sockets) and `SandboxState` directly."""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import pytest

from worker.sandbox import SANDBOX_CREDENTIALS
from worker.sandbox.server import VENDOR_APIS, SandboxApp
from worker.sandbox.state import PersonStore, SandboxState

CONVERTLOOP_BASIC = base64.b64encode(b"sandbox-app:sandbox-convertloop-key").decode()
AUTH = {
    "convertloop": {"authorization": f"Basic {CONVERTLOOP_BASIC}"},
    "loops": {"authorization": "Bearer sandbox-loops-key"},
    "conveyour": {"x-conveyour-appkey": "sandbox-appkey", "x-conveyour-token": "sandbox-conveyour-token"},
}
ADA = "ada@example.com"


@pytest.fixture
def app() -> SandboxApp:
    return SandboxApp(api(dict(SANDBOX_CREDENTIALS)) for api in VENDOR_APIS)


def send(
    app: SandboxApp, vendor: str, path: str, body: Any, method: str = "POST", headers: dict[str, str] | None = None
) -> int:
    """One vendor request; returns its status."""
    full_path = app.vendors[vendor].prefix + path
    all_headers = {**AUTH[vendor], **(headers or {})}
    status, _, _ = app.dispatch(method, full_path, "", all_headers, json.dumps(body).encode())
    return status


def control(app: SandboxApp, method: str, path: str, query: str = "", body: Any = None) -> tuple[int, Any]:
    raw = b"" if body is None else json.dumps(body).encode()
    status, payload, _ = app.dispatch(method, "/_sandbox" + path, query, {}, raw)
    return status, payload


def person(app: SandboxApp, vendor: str, key: str) -> dict[str, Any] | None:
    return app.state.person_states(vendor, key)[vendor].get(key)


# -- ConvertLoop ---------------------------------------------------------------------------------------


def test_convertloop_people_attributes_last_write_wins_identity_and_control_keys_excluded(app: SandboxApp) -> None:
    body = {"email": ADA, "user_id": "42", "pid": "c1", "plan": "free", "resubscribe": True, "first_name": "Ada"}
    assert send(app, "convertloop", "/people", body) == 200
    assert send(app, "convertloop", "/people", {"email": ADA, "plan": "pro"}) == 200
    assert person(app, "convertloop", ADA) == {
        "attributes": {"plan": "pro", "first_name": "Ada"},
        "segments": [],
        "events": [],
        "writes": 2,
    }


def test_convertloop_person_key_is_email_else_user_id_else_pid(app: SandboxApp) -> None:
    send(app, "convertloop", "/people", {"user_id": "42", "pid": "c1", "a": 1})
    send(app, "convertloop", "/people", {"pid": "c2", "a": 2})
    send(app, "convertloop", "/people", {"email": "", "user_id": "43", "a": 3})  # an empty email is no email
    states = app.state.person_states("convertloop")["convertloop"]
    assert {key: s["attributes"]["a"] for key, s in states.items()} == {"42": 1, "c2": 2, "43": 3}


def test_convertloop_remove_from_segments_applies_after_add_to_segments(app: SandboxApp) -> None:
    body = {"email": ADA, "add_to_segments": ["Trial", "VIP"], "remove_from_segments": ["Trial"]}
    assert send(app, "convertloop", "/people", body) == 200
    assert person(app, "convertloop", ADA)["segments"] == ["VIP"]  # type: ignore[index]
    # Removing first and adding after (across two requests) leaves it in.
    send(app, "convertloop", "/people", {"email": ADA, "remove_from_segments": ["Beta"]})
    send(app, "convertloop", "/people", {"email": ADA, "add_to_segments": ["Beta"]})
    assert person(app, "convertloop", ADA)["segments"] == ["Beta", "VIP"]  # type: ignore[index]


def test_convertloop_segments_as_comma_separated_string(app: SandboxApp) -> None:
    body = {"email": ADA, "add_to_segments": "Trial, VIP,Churned", "remove_from_segments": "Churned"}
    assert send(app, "convertloop", "/people", body) == 200
    assert person(app, "convertloop", ADA)["segments"] == ["Trial", "VIP"]  # type: ignore[index]


def test_convertloop_event_logs_append_events_and_update_the_person(app: SandboxApp) -> None:
    first = {
        "name": "made_sale",
        "person": {"email": ADA, "plan": "pro", "add_to_segments": ["Buyers"], "remove_from_segments": "Trial"},
        "metadata": {"amount": 1000},
        "ocurred_at": "2024-05-01T12:00:00Z",
        "occured_at": "2023-01-01T00:00:00Z",  # ocurred_at comes first
    }
    second = {"name": "visited", "person": {"email": ADA}, "occured_at": "2024-05-02T00:00:00Z"}
    third = {"name": "left", "person": {"email": ADA}, "occurred_at": "2024-05-03T00:00:00Z"}  # not a documented key
    send(app, "convertloop", "/people", {"email": ADA, "add_to_segments": ["Trial"]})
    assert [send(app, "convertloop", "/event_logs", b) for b in (first, second, third)] == [200, 200, 200]
    assert person(app, "convertloop", ADA) == {
        "attributes": {"plan": "pro"},
        "segments": ["Buyers"],
        "events": [
            {"name": "made_sale", "metadata": {"amount": 1000}, "occurred_at": "2024-05-01T12:00:00Z"},
            {"name": "visited", "metadata": {}, "occurred_at": "2024-05-02T00:00:00Z"},
            {"name": "left", "metadata": {}, "occurred_at": None},
        ],
        "writes": 4,
    }


def test_convertloop_event_without_person_is_accepted_but_nobodys(app: SandboxApp) -> None:
    assert send(app, "convertloop", "/event_logs", {"name": "anonymous"}) == 200
    assert app.state.person_states("convertloop") == {"convertloop": {}}


# -- Loops ---------------------------------------------------------------------------------------------


def test_loops_contact_properties_merge_and_mailing_lists_per_list(app: SandboxApp) -> None:
    create = {"email": ADA, "userId": "u-1", "firstName": "Ada", "plan": "free", "mailingLists": {"l1": True}}
    assert send(app, "loops", "/contacts/create", create) == 200
    update = {"email": ADA, "plan": "pro", "mailingLists": {"l1": False, "l2": True}}
    assert send(app, "loops", "/contacts/update", update, method="PUT") == 200
    assert person(app, "loops", ADA) == {
        "properties": {"firstName": "Ada", "plan": "pro"},
        "mailing_lists": {"l1": False, "l2": True},
        "events": [],
        "writes": 2,
    }


def test_loops_person_key_is_email_else_user_id(app: SandboxApp) -> None:
    assert send(app, "loops", "/contacts/update", {"userId": "u-1", "plan": "pro"}, method="PUT") == 200
    assert send(app, "loops", "/contacts/update", {"email": ADA, "userId": "u-2"}, method="PUT") == 200
    assert sorted(app.state.person_states("loops")["loops"]) == [ADA, "userId:u-1"]


def test_loops_event_appends_and_its_top_level_properties_update_the_contact(app: SandboxApp) -> None:
    body = {"email": ADA, "eventName": "upgraded", "eventProperties": {"from": "free"}, "plan": "pro",
            "mailingLists": {"l9": True}}
    assert send(app, "loops", "/events/send", body, headers={"idempotency-key": "evt-1"}) == 200
    assert send(app, "loops", "/events/send", {"email": ADA, "eventName": "paid"}) == 200
    assert person(app, "loops", ADA) == {
        "properties": {"plan": "pro"},
        "mailing_lists": {"l9": True},
        "events": [
            {"eventName": "upgraded", "eventProperties": {"from": "free"}, "idempotency_key": "evt-1"},
            {"eventName": "paid", "eventProperties": {}, "idempotency_key": None},
        ],
        "writes": 2,
    }


def test_loops_idempotency_conflict_409_is_not_a_write(app: SandboxApp) -> None:
    body = {"email": ADA, "eventName": "signup", "plan": "pro"}
    assert send(app, "loops", "/events/send", body, headers={"idempotency-key": "k"}) == 200
    again = {**body, "plan": "changed-by-the-repeat"}
    assert send(app, "loops", "/events/send", again, headers={"idempotency-key": "k"}) == 409
    state = person(app, "loops", ADA)
    assert state is not None
    assert state["writes"] == 1 and len(state["events"]) == 1 and state["properties"] == {"plan": "pro"}


# -- ConveYour -----------------------------------------------------------------------------------------


def test_conveyour_identify_traits_tags_and_increments(app: SandboxApp) -> None:
    first = {"id": "u1", "traits": {"plan": "free", "logins": {"$inc": 2}, "score": "n/a",
                                    "tags": {"add": ["a", "b"], "remove": ["b"]}}}
    second = {"id": "u1", "traits": {"plan": "pro", "logins": {"$inc": 3}, "score": {"$inc": 1.5},
                                     "odd": {"$inc": "x"}, "tags": {"remove": ["a"], "add": ["c"]}}}
    assert send(app, "conveyour", "/analytics/identify", first) == 200
    assert send(app, "conveyour", "/analytics/identify", second) == 200
    assert person(app, "conveyour", "u1") == {
        # score was not a number: counted from 0; {"$inc": "x"} is no increment, kept as a value
        "traits": {"plan": "pro", "logins": 5, "score": 1.5, "odd": {"$inc": "x"}},
        "tags": ["c"],  # b added then removed in one call; a removed by the second
        "events": [],
        "writes": 2,
    }


def test_conveyour_bulk_identify_applies_items_in_array_order(app: SandboxApp) -> None:
    items = [
        {"id": "u1", "traits": {"plan": "free", "tags": {"add": ["trial"]}}},
        {"id": "u2", "traits": {"plan": "team"}},
        {"id": "u1", "traits": {"plan": "pro", "tags": {"remove": ["trial"]}}},
        {"id": "u1"},
    ]
    assert send(app, "conveyour", "/analytics/identify", items) == 200
    states = app.state.person_states("conveyour")["conveyour"]
    assert states["u1"] == {"traits": {"plan": "pro"}, "tags": [], "events": [], "writes": 3}
    assert states["u2"]["traits"] == {"plan": "team"} and states["u2"]["writes"] == 1


def test_conveyour_track_appends_each_event_in_order(app: SandboxApp) -> None:
    events = [{"event": "made_sale", "properties": {"amount": 1000}}, {"event": "logged_in"}]
    assert send(app, "conveyour", "/analytics/track", {"id": "u1", "events": events}) == 200
    assert send(app, "conveyour", "/analytics/track", {"id": "u1", "events": [{"event": "third"}]}) == 200
    assert person(app, "conveyour", "u1") == {
        "traits": {},
        "tags": [],
        "events": [
            {"event": "made_sale", "properties": {"amount": 1000}},
            {"event": "logged_in", "properties": {}},
            {"event": "third", "properties": {}},
        ],
        "writes": 2,
    }


# -- refused writes --------------------------------------------------------------------------------------


def test_refused_writes_change_nothing(app: SandboxApp) -> None:
    body = {"email": ADA, "plan": "refused"}
    app.state.configure("convertloop", {"fail_next": [503, {"status": 200, "body": {"success": True}}]})
    assert send(app, "convertloop", "/people", body) == 503  # injected failure
    assert send(app, "convertloop", "/people", body) == 200  # an injected 200: the vendor never took it
    assert send(app, "convertloop", "/people", body, headers={"authorization": "Basic bm9wZTpub3Bl"}) == 401
    assert send(app, "convertloop", "/people", {**body, "add_to_segments": [""]}) == 422  # validation
    assert send(app, "convertloop", "/nowhere", body) == 404
    assert send(app, "loops", "/contacts/update", {"email": ADA, "mailingLists": {"l": "yes"}}, method="PUT") == 400
    app.state.configure("conveyour", {"rate_limit": 1})
    assert send(app, "conveyour", "/analytics/identify", {"id": "u1", "traits": {"plan": "kept"}}) == 200
    assert send(app, "conveyour", "/analytics/identify", {"id": "u1", "traits": {"plan": "refused"}}) == 429
    assert app.state.person_states() == {
        "convertloop": {},
        "loops": {},
        "conveyour": {"u1": {"traits": {"plan": "kept"}, "tags": [], "events": [], "writes": 1}},
    }


# -- arrival order ----------------------------------------------------------------------------------------


def _begin(state: SandboxState, vendor: str = "loops") -> dict[str, Any]:
    return state.begin(vendor, "PUT", "/contacts/update", "", {}, b"{}", True, None)


def _plan(key: str, value: str) -> list[tuple[str, list[tuple[str, Any, Any]]]]:
    return [(key, [("set", "plan", value), ("event", {"plan": value}, None)])]


def test_arrival_order_wins_when_an_earlier_arrival_finishes_later() -> None:
    state = SandboxState(["loops"])
    early, late = _begin(state), _begin(state)  # seq 1, seq 2
    state.finish(late, 200, _plan("ada", "pro"))
    # Read while the earlier one is still in flight: the later write shows.
    assert state.person_states("loops", "ada")["loops"]["ada"]["fields"] == {"plan": "pro"}
    state.finish(early, 200, _plan("ada", "free"))  # answered last, arrived first
    ada = state.person_states("loops", "ada")["loops"]["ada"]
    assert ada["fields"] == {"plan": "pro"}
    assert ada["events"] == [{"plan": "free"}, {"plan": "pro"}] and ada["writes"] == 2


def test_in_arrival_order_the_later_arrival_still_wins() -> None:
    state = SandboxState(["loops"])
    early, late = _begin(state), _begin(state)
    state.finish(early, 200, _plan("ada", "free"))
    state.finish(late, 200, _plan("ada", "pro"))
    assert state.person_states("loops")["loops"]["ada"]["fields"] == {"plan": "pro"}


def test_a_refused_earlier_arrival_lets_later_writes_fold() -> None:
    store = PersonStore()
    first, second, third = object(), object(), object()
    for seq, record in enumerate((first, second, third), start=1):
        store.arrive(seq, record)
    assert store.depart(3, third, _plan("ada", "third"))
    assert store.depart(2, second, _plan("ada", "second"))
    assert "ada" not in store.persons  # both wait for seq 1
    assert store.view()["ada"].fields == {"plan": "third"}
    assert store.depart(1, first, [])  # seq 1 refused: nothing to apply, the others fold
    assert store.persons["ada"].fields == {"plan": "third"} and store.persons["ada"].writes == 2


def test_writes_with_a_refused_status_are_ignored() -> None:
    state = SandboxState(["loops"])
    state.finish(_begin(state), 503, _plan("ada", "refused"))
    assert state.person_states() == {"loops": {}}


def test_reset_forgets_state_and_a_request_from_before_it() -> None:
    state = SandboxState(["loops"])
    state.finish(_begin(state), 200, _plan("ada", "before"))
    in_flight = _begin(state)
    state.reset()
    after = _begin(state)  # seq 1 again
    state.finish(in_flight, 200, _plan("ada", "stale"))  # answered after the reset: ignored
    assert state.person_states() == {"loops": {}}
    assert state.stats()["vendors"]["loops"] == {"received": 1, "by_status": {}}
    state.finish(after, 200, _plan("ada", "after"))
    assert state.person_states()["loops"]["ada"]["fields"] == {"plan": "after"}


def test_concurrent_writes_fold_in_arrival_order(app: SandboxApp) -> None:
    """Threads with jittered latency: every increment counts, and the last arrival's value wins."""
    app.state.configure("conveyour", {"latency_ms": 2, "latency_jitter_ms": 2})

    def worker(n: int) -> None:
        for i in range(25):
            traits = {"hits": {"$inc": 1}, "last": f"{n}-{i}"}
            assert send(app, "conveyour", "/analytics/identify", {"id": "u1", "traits": traits}) == 200

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    u1 = person(app, "conveyour", "u1")
    assert u1 is not None and u1["writes"] == 200 and u1["traits"]["hits"] == 200
    last_arrival = max(app.state.requests(vendor="conveyour"), key=lambda r: r["seq"])
    assert u1["traits"]["last"] == last_arrival["body"]["traits"]["last"]


# -- bounds ---------------------------------------------------------------------------------------------


def test_persons_and_events_are_capped() -> None:
    state = SandboxState(["loops"], max_persons=2, max_person_events=2)
    for key in ("a", "b", "a", "c"):  # c is the third person: b, least recently written, goes
        state.finish(_begin(state), 200, _plan(key, key))
    assert sorted(state.person_states()["loops"]) == ["a", "c"]
    a = state.person_states("loops", "a")["loops"]["a"]
    assert a["writes"] == 2 and len(a["events"]) == 2
    state.finish(_begin(state), 200, _plan("a", "third"))
    a = state.person_states("loops", "a")["loops"]["a"]
    assert a["writes"] == 3 and a["events"] == [{"plan": "a"}, {"plan": "third"}]  # the oldest dropped


# -- the control endpoint -------------------------------------------------------------------------------


def test_state_endpoint_shape_filters_and_reset(app: SandboxApp) -> None:
    send(app, "convertloop", "/people", {"email": ADA, "plan": "pro"})
    send(app, "loops", "/contacts/update", {"email": ADA, "plan": "pro"}, method="PUT")
    send(app, "conveyour", "/analytics/identify", [{"id": ADA}, {"id": "u2"}])
    status, everything = control(app, "GET", "/state")
    assert status == 200 and list(everything) == ["convertloop", "loops", "conveyour"]
    assert everything["loops"] == {
        ADA: {"properties": {"plan": "pro"}, "mailing_lists": {}, "events": [], "writes": 1}
    }
    assert control(app, "GET", "/state", "vendor=conveyour")[1] == {"conveyour": {
        ADA: {"traits": {}, "tags": [], "events": [], "writes": 1},
        "u2": {"traits": {}, "tags": [], "events": [], "writes": 1},
    }}
    by_person = control(app, "GET", "/state", "person=u2")[1]
    assert by_person == {"convertloop": {}, "loops": {}, "conveyour": {"u2": everything["conveyour"]["u2"]}}
    assert control(app, "GET", "/state", "vendor=loops&person=nobody")[1] == {"loops": {}}
    status, payload = control(app, "GET", "/state", "who=me")
    assert status == 400 and "unknown filters" in payload["message"]
    status, payload = control(app, "GET", "/state", "vendor=mailchimp")
    assert status == 400 and "unknown vendor" in payload["message"]
    assert control(app, "POST", "/state")[0] == 405
    assert control(app, "POST", "/reset")[0] == 200
    assert control(app, "GET", "/state")[1] == {"convertloop": {}, "loops": {}, "conveyour": {}}
