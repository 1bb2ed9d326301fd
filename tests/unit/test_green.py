"""A consumer without Celery's event loop (the gevent pool): worker/broker/green.py and the transport's Poller."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
from kombu.transport.redis import Empty

from tests.helpers import run_python
from worker.broker import green
from worker.broker.transport import Poller


class Channel:
    """What kombu's poller reads of a channel to restore its unacknowledged messages."""

    def __init__(self) -> None:
        self.active_queues = {"loops"}
        self.active_fanout_queues: set[str] = set()
        self.unacked_restore_limit = 10
        self.unacked_restore_throttle = 1
        self.connection_errors = ()
        self.restores = 0
        self.qos = SimpleNamespace(restore_visible=self._restore, can_consume=lambda: False)

    def _restore(self, **_: object) -> None:
        self.restores += 1

    def maybe_refresh_binding_expiry(self) -> None:
        pass


def test_restores_run_at_most_every_restore_every_seconds(monkeypatch):
    poller, channel = Poller(), Channel()
    poller.add(channel)
    for _ in range(3):
        poller.maybe_restore_messages()
    assert channel.restores == 3  # kombu's pace until a green consumer sets one
    clock = [100.0]
    monkeypatch.setattr("worker.broker.transport.time.monotonic", lambda: clock[0])
    poller.restore_every = 5.0
    poller.maybe_restore_messages()
    poller.maybe_restore_messages()
    clock[0] += 4.9
    poller.maybe_restore_messages()
    assert channel.restores == 4
    clock[0] += 0.2
    poller.maybe_restore_messages()
    assert channel.restores == 5


def test_a_wake_ends_the_consumers_wait_as_a_timeout():
    poller = Poller()
    poller.wake()  # no wake-ups enabled (the threads pool): nothing happens
    with pytest.raises(Empty):
        poller.get(lambda *a: None, timeout=0)
    poller.enable_wakeups()
    poller.wake()
    poller.wake()
    with pytest.raises(socket.timeout):  # Celery's loop takes it as "nothing came", then runs what it was handed
        poller.get(lambda *a: None, timeout=5)
    with pytest.raises(Empty):  # drained: the next wait is an ordinary one
        poller.get(lambda *a: None, timeout=0)
    poller.close()


def consumer(hub: object) -> SimpleNamespace:
    later: list = []
    repeated: list = []
    timer = SimpleNamespace(call_after=lambda s, fun: later.append(fun) or SimpleNamespace(cancel=lambda: None),
                            call_repeatedly=lambda s, fun: repeated.append((s, fun)) or
                            SimpleNamespace(cancel=lambda: None))
    poller = Poller()
    return SimpleNamespace(hub=hub, timer=timer, later=later, repeated=repeated,
                           pool=SimpleNamespace(), connection=SimpleNamespace(
                               transport=SimpleNamespace(cycle=poller),
                               transport_options={"unacked_restore_interval": 2.0}))


@pytest.fixture
def gevent_config():
    gevent = pytest.importorskip("gevent")
    was = gevent.config.track_greenlet_tree
    gevent.config.track_greenlet_tree = True
    yield gevent.config
    gevent.config.track_greenlet_tree = was


def test_the_step_does_nothing_with_the_event_loop(gevent_config):
    c = consumer(hub=object())
    green.GreenStep(c).start(c)
    assert c.repeated == []
    assert c.connection.transport.cycle.restore_every is None
    assert gevent_config.track_greenlet_tree is True


def test_on_gevent_spawned_greenlets_keep_no_spawning_tree(gevent_config):
    """gevent's debugging record of who spawned each greenlet (with its stack) is ten objects per task in
    reference cycles, which the collector must find."""
    import gevent

    c = consumer(hub=None)
    step = green.GreenStep(c)
    step.start(c)
    try:
        assert gevent_config.track_greenlet_tree is False
        assert gevent.Greenlet(lambda: None).spawning_stack is None
    finally:
        step.stop(c)
        c.connection.transport.cycle.close()


def test_without_the_event_loop_restores_go_on_a_timer():
    c = consumer(hub=None)
    step = green.GreenStep(c)
    step.start(c)
    cycle = c.connection.transport.cycle
    ((interval, restore),) = c.repeated
    assert interval == 2.0 and cycle.restore_every == 2.0
    channel = Channel()
    cycle.add(channel)
    restore()
    assert channel.restores == 1
    step.stop(c)
    cycle.close()


def test_a_green_pool_chosen_without_its_patching_is_refused():
    """Celery patches the standard library for gevent only for ``-P gevent``; this test process is not patched, as a
    worker whose configuration alone chose gevent would not be."""
    from worker.broker.app import _check_pool, _unpatched_green_pool

    assert _unpatched_green_pool({"pool_cls": None}, "gevent") == "gevent"
    assert _unpatched_green_pool({"pool_cls": "threads"}, "gevent") is None  # -P threads wins
    assert _unpatched_green_pool({"pool_cls": None}, "threads") is None
    with pytest.raises(SystemExit) as stopped:
        _check_pool(conf=SimpleNamespace(worker_pool="threads"), options={"pool_cls": "gevent"})
    assert stopped.value.code == 2


def test_the_ticker_can_be_asked_whether_it_runs_after_it_stopped():
    """The ticker's own stop flag once shadowed ``Thread._stop``: ``is_alive()`` of an ended ticker raised
    TypeError (on gevent, every ended greenlet-thread did, from gevent's own bookkeeping)."""
    from worker.broker.ticker import Ticker

    schedule = SimpleNamespace(promote=lambda vendor: (0, None))
    breaker = SimpleNamespace(enabled=False)
    t = Ticker(["loops"], schedule, breaker, hold=lambda q: None, release=lambda q: None, interval=0.01)
    t.start()
    t.stop()
    t.join(5)
    assert not t.is_alive() and "stopped" in repr(t)


def test_a_ready_worker_freezes_what_start_up_made_out_of_the_collectors_way():
    """Full collections over start-up's objects stalled every thread now and then (late rate-limit slots)."""
    import gc

    from celery import signals

    from worker.broker.app import GC_THRESHOLDS

    gc.unfreeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # Python's default (another test may have made a worker ready already)
    try:
        assert gc.get_freeze_count() == 0
        signals.worker_ready.send(sender=None)
        assert gc.get_freeze_count() > 1000
        # A delivery's few objects in reference cycles no longer start a young collection every few deliveries.
        assert gc.get_threshold() == GC_THRESHOLDS and GC_THRESHOLDS[0] > 700
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


READABILITY = r'''
import json
import select
from gevent import monkey
monkey.patch_all()
import gevent, socket
from worker import http11

poll = http11.plain_poll() if FIX else select.poll  # select.poll: gevent's own, after patch_all
a, b = socket.socketpair()
conn = http11.Connection(http11.Origin("http", "127.0.0.1", 1), None, poll=poll)
ran = []


def check():
    gevent.spawn(ran.append, 1)  # ready to run at the next switch to the hub
    readable = conn._readable(a)
    return readable, bool(ran)


idle = check()
b.sendall(b"x")
gevent.sleep(0.01)  # let the byte arrive (and the spawned greenlet run)
ran.clear()
pending = check()
print(json.dumps({"original": poll is monkey.get_original("select", "poll"), "idle": idle, "pending": pending}))
'''


@pytest.mark.parametrize("variant", ["fixed", "gevent's own"])
def test_on_gevent_a_connection_check_does_not_switch_to_other_greenlets(variant):
    """An exchange checks its kept-alive connection (a 0 s poll) between the limiter's admission and the request:
    gevent's poll switches to every ready greenlet first, which made a request late for its slot. The worker's
    connections (:mod:`worker.http11`) answer the same (idle: not readable; data waiting: readable) without running
    another greenlet."""
    got = run_python(f"FIX = {variant == 'fixed'}\n" + READABILITY)
    if variant == "fixed":
        assert got == {"original": True, "idle": [False, False], "pending": [True, False]}, got
    else:  # what the fix is for: gevent's check runs the other greenlet before it answers
        assert got["original"] is False and got["idle"] == [False, True], got
