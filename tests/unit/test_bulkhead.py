"""The bulkhead's counting and decisions (worker/broker/bulkhead.py), and how the queue gate combines its stops
with throttle pauses and circuit-breaker holds (worker/broker/gate.py), on a stand-in consumer."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from celery import signals

from tests.helpers import ShutLimiter
from worker.broker import bulkhead, gate
from worker.broker.bulkhead import RECONCILE_GRACE, Bulkhead, thread_share
from worker.dev.localstack import wait_until


@pytest.mark.parametrize(("concurrency", "queues", "share", "expected"), [
    (32, 3, 0.5, 16),
    (16, 3, 0.5, 8),
    (32, 2, 0.5, 16),
    (32, 3, 0.3, 9),
    (32, 1, 0.5, 32),   # a worker of one queue: every thread
    (32, 3, 1.0, 32),   # 1: no bulkhead
    (1, 3, 0.5, 1),     # never below one thread
    (3, 3, 0.1, 1),
])
def test_thread_share(concurrency, queues, share, expected):
    assert thread_share(concurrency, queues, share) == expected


def test_a_queue_stops_once_at_its_share_and_resumes_once_below_it():
    b = Bulkhead(3, ["loops", "convertloop"])
    assert [b.enter(f"e{i}.loops", "loops") for i in range(3)] == [False, False, True]
    assert b.full() == {"loops"}
    # A message the consumer had already taken when the queue stopped still runs, and counts.
    assert b.enter("e3.loops", "loops") is False
    assert b.held("loops") == 4
    assert b.leave("e0.loops") is None          # 3 held: still at the share
    assert b.leave("e1.loops") == "loops"       # 2: take the queue again
    assert b.leave("e2.loops") is None          # already being taken
    assert b.full() == set()
    assert b.held("loops") == 1                 # e3
    assert b.enter("e4.loops", "loops") is False
    assert b.enter("e5.loops", "loops") is True  # back at 3


def test_queues_are_counted_apart_and_other_queues_not_at_all():
    b = Bulkhead(2, ["loops", "convertloop"])
    assert b.enter("a.loops", "loops") is False
    assert b.enter("a.convertloop", "convertloop") is False
    assert b.enter("b.loops", "loops") is True
    assert b.full() == {"loops"}
    assert b.held("convertloop") == 1
    assert (b.room("loops"), b.room("convertloop")) == (0, 1)  # what a take may still bring of each
    assert b.enter("x.noop", "noop") is False   # not a queue of this worker
    assert b.held("noop") == 0 and b.room("noop") is None
    assert b.leave("x.noop") is None
    assert b.leave("never-received") is None
    assert b.leave("a.convertloop") is None
    assert b.held("convertloop") == 0


def test_a_task_id_received_twice_counts_twice_and_leaves_twice():
    b = Bulkhead(2, ["loops"])
    assert b.enter("e1.loops", "loops") is False
    assert b.enter("e1.loops", "loops") is True   # redelivered while the first still runs
    assert b.leave("e1.loops") == "loops"
    assert b.leave("e1.loops") is None
    assert b.held("loops") == 0
    assert b.leave("e1.loops") is None           # a third end (e.g. revoked, then ran) changes nothing
    assert b.held("loops") == 0


def test_reconcile_forgets_only_old_deliveries_the_worker_no_longer_has():
    now = [100.0]
    b = Bulkhead(2, ["loops"], clock=lambda: now[0])
    b.enter("lost.loops", "loops")
    b.enter("running.loops", "loops")
    assert b.full() == {"loops"}
    assert b.reconcile(lambda task_id: False) == []              # both younger than the grace: kept
    now[0] += RECONCILE_GRACE + 1
    known = {"running.loops"}
    assert b.reconcile(lambda task_id: task_id in known) == ["loops"]   # "lost" ended without a signal
    assert b.held("loops") == 1
    assert b.leave("lost.loops") is None                          # already forgotten: no double count
    assert b.held("loops") == 1
    assert b.enter("young.loops", "loops") is True
    assert b.reconcile(lambda task_id: task_id in known) == []    # "young" is unknown, but too young to tell
    assert b.held("loops") == 2


def test_counts_stay_exact_under_threads():
    b = Bulkhead(5, ["loops"])
    stops, resumes = [], []

    def run(n: int) -> None:
        for i in range(500):
            task_id = f"{n}-{i}.loops"
            if b.enter(task_id, "loops"):
                stops.append(1)
            if b.leave(task_id) is not None:
                resumes.append(1)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.held("loops") == 0
    assert b.full() == set()
    assert len(stops) == len(resumes)   # every stop was followed by exactly one resume


# -- the gate, on a stand-in consumer -------------------------------------------------------------------------


class FakeTaskConsumer:
    def __init__(self, queues):
        self.active = set(queues)

    def cancel_by_queue(self, queue):
        self.active.discard(queue)

    def consuming_from(self, queue):
        return queue in self.active

    def add_queue(self, queue):
        self.active.add(queue.name)

    def consume(self):
        pass


class FakeConsumer:
    """The parts of Celery's consumer the gate uses; call_soon and timers run when the test says."""

    def __init__(self, queues):
        self.task_consumer = FakeTaskConsumer(queues)
        self.app = SimpleNamespace(amqp=SimpleNamespace(queues={q: SimpleNamespace(name=q) for q in queues}))
        self.soon: list = []
        self.later: list = []
        self.timer = SimpleNamespace(call_after=lambda seconds, fun, args: self.later.append((fun, args)))
        self.hub = object()  # the threads pool's event loop (None: a green pool's consumer)

    def call_soon(self, fun, *args):
        self.soon.append((fun, args))

    def run_soon(self):
        while self.soon:
            fun, args = self.soon.pop(0)
            fun(*args)

    def run_timers(self):
        """The timers that are due, then what they handed to the consumer's loop."""
        while self.later:
            fun, args = self.later.pop(0)
            fun(*args)
        self.run_soon()

    def consuming(self, queue):
        return self.task_consumer.consuming_from(queue)


@pytest.fixture
def consumer(monkeypatch):
    c = FakeConsumer(["loops", "convertloop"])
    monkeypatch.setattr(gate, "_consumer", c)
    monkeypatch.setattr(gate, "_consumer_thread", threading.get_ident())  # this test is the consumer's thread
    yield c
    for s in (gate._paused, gate._held, gate._full, gate._crowded):
        s.clear()


def test_limit_on_the_consumers_thread_stops_at_once(consumer):
    gate.limit("loops")
    assert not consumer.consuming("loops") and consumer.soon == []
    gate.unlimit("loops")
    assert not consumer.consuming("loops")
    consumer.run_soon()
    assert consumer.consuming("loops") and consumer.consuming("convertloop")


def test_limit_from_another_thread_goes_through_the_consumers_loop(consumer):
    t = threading.Thread(target=gate.limit, args=("loops",))
    t.start()
    t.join()
    assert consumer.consuming("loops")
    consumer.run_soon()
    assert not consumer.consuming("loops")


def test_a_crowded_queue_is_taken_again_once_uncrowded_unless_something_else_stops_it(consumer):
    t = threading.Thread(target=gate.crowd, args=("loops",))  # told from a delivery thread
    t.start()
    t.join()
    consumer.run_soon()
    assert not consumer.consuming("loops") and consumer.consuming("convertloop")
    gate.pause("loops", 0.1)  # a throttled delivery's pause ends: still crowded
    consumer.run_soon()
    consumer.run_timers()
    assert not consumer.consuming("loops")
    gate.hold("loops")  # the breaker opens meanwhile
    gate.uncrowd("loops")
    consumer.run_soon()
    assert not consumer.consuming("loops")
    gate.release("loops")
    consumer.run_soon()
    assert consumer.consuming("loops")


def test_the_worker_stops_taking_a_vendor_while_its_token_waiters_crowd(consumer, monkeypatch):
    """The worker's task module listens to the throttle: two thirds of the waiters taken stops the vendor's
    queue; back to a third takes it again."""
    from worker.broker import tasks
    from worker.limits import throttle as throttling
    from worker.limits.throttle import Throttle

    assert tasks._crowded in throttling._listeners
    limiter = ShutLimiter()
    throttle = Throttle(max_waiters=3, sleep=limiter.sleep, max_total=3600)  # waiters wait until opened
    waiters = [threading.Thread(target=throttle.wait, args=("loops", limiter), daemon=True) for _ in range(2)]
    for t in waiters:
        t.start()
    # The second waiter asks the consumer's loop to stop the queue.
    wait_until(lambda: consumer.soon, timeout=20, message="the queue to be stopped")
    consumer.run_soon()
    assert not consumer.consuming("loops") and consumer.consuming("convertloop")
    limiter.opened.set()
    for t in waiters:
        t.join(20)
    assert throttle.waiting("loops") == 0
    consumer.run_soon()
    assert consumer.consuming("loops")


def test_the_bulkhead_never_resumes_a_queue_the_breaker_holds(consumer):
    gate.limit("loops")
    gate.hold("loops")
    gate.unlimit("loops")
    consumer.run_soon()
    assert not consumer.consuming("loops")
    gate.release("loops")
    consumer.run_soon()
    assert consumer.consuming("loops")


def test_a_breaker_release_never_resumes_a_queue_at_its_share(consumer):
    gate.hold("loops")
    consumer.run_soon()
    gate.limit("loops")
    gate.release("loops")
    consumer.run_soon()
    assert not consumer.consuming("loops")
    gate.unlimit("loops")
    consumer.run_soon()
    assert consumer.consuming("loops")


def test_the_end_of_a_pause_never_resumes_a_queue_at_its_share_nor_the_bulkhead_a_paused_one(consumer):
    gate.pause("loops", 0.5)
    consumer.run_soon()
    assert not consumer.consuming("loops")
    gate.limit("loops")
    consumer.run_timers()                        # the pause is over; the share still stops it
    assert not consumer.consuming("loops")
    gate.unlimit("loops")
    consumer.run_soon()
    assert consumer.consuming("loops")

    gate.pause("loops", 0.5)
    consumer.run_soon()
    gate.limit("loops")
    gate.unlimit("loops")
    consumer.run_soon()
    assert not consumer.consuming("loops")      # still paused
    consumer.run_timers()
    assert consumer.consuming("loops")


def test_the_celery_signals_drive_the_gate(consumer, monkeypatch):
    monkeypatch.setattr(bulkhead, "_bulkhead", Bulkhead(2, ["loops", "convertloop"]))

    def received(task_id, queue):
        request = SimpleNamespace(id=task_id, delivery_info={"exchange": "", "routing_key": queue})
        signals.task_received.send(sender=consumer, request=request)

    received("a.loops", "loops")
    received("a.convertloop", "convertloop")
    assert consumer.consuming("loops")
    received("b.loops", "loops")
    assert not consumer.consuming("loops") and consumer.consuming("convertloop")
    signals.task_postrun.send(sender=None, task_id="a.loops", task=None, args=(), kwargs={}, retval=None,
                              state="SUCCESS")
    consumer.run_soon()
    assert consumer.consuming("loops")
    received("c.loops", "loops")
    assert not consumer.consuming("loops")
    signals.task_revoked.send(sender=None, request=SimpleNamespace(id="c.loops"), terminated=False, signum=None,
                              expired=True)
    consumer.run_soon()
    assert consumer.consuming("loops")


def test_the_step_sizes_the_share_and_stops_full_queues_again_after_a_reconnection(consumer, monkeypatch):
    from celery.concurrency.thread import TaskPool

    from worker.settings import get_settings

    monkeypatch.setenv("BULKHEAD_SHARE", "0.5")
    get_settings.cache_clear()
    monkeypatch.setattr(bulkhead, "_bulkhead", None)
    consumer.task_consumer.queues = [SimpleNamespace(name=q) for q in ("loops", "convertloop")]
    consumer.pool = TaskPool(limit=4)
    consumer.timer.call_repeatedly = lambda seconds, fun: SimpleNamespace(cancel=lambda: None)
    step = bulkhead.BulkheadStep(None)
    try:
        step.start(consumer)
        b = bulkhead._bulkhead
        assert b is not None and b.limit == 2 and b.queues == {"loops", "convertloop"}
        for task_id in ("a.loops", "b.loops"):
            signals.task_received.send(sender=consumer, request=SimpleNamespace(
                id=task_id, delivery_info={"routing_key": "loops"}))
        assert not consumer.consuming("loops")
        # The broker connection is lost: Celery restarts the consumer's steps; the new task consumer takes every
        # queue, and the gate forgets what it stopped. The deliveries still run.
        step.stop(consumer)
        gate._full.clear()
        consumer.task_consumer.active = {"loops", "convertloop"}
        step.start(consumer)
        assert bulkhead._bulkhead is b and b.held("loops") == 2
        assert not consumer.consuming("loops") and consumer.consuming("convertloop")
        signals.task_postrun.send(sender=None, task_id="a.loops")
        consumer.run_soon()
        assert consumer.consuming("loops")
    finally:
        step.stop(consumer)
        get_settings.cache_clear()


def test_no_bulkhead_on_a_worker_of_one_queue_or_another_pool(consumer, monkeypatch):
    from celery.concurrency.solo import TaskPool as SoloPool
    from celery.concurrency.thread import TaskPool

    from worker.settings import get_settings

    get_settings.cache_clear()
    consumer.timer.call_repeatedly = lambda seconds, fun: SimpleNamespace(cancel=lambda: None)
    step = bulkhead.BulkheadStep(None)
    for queues, pool in ((["loops"], TaskPool(limit=4)), (["loops", "convertloop"], SoloPool(limit=4))):
        monkeypatch.setattr(bulkhead, "_bulkhead", None)
        consumer.task_consumer.queues = [SimpleNamespace(name=q) for q in queues]
        consumer.pool = pool
        step.start(consumer)
        assert bulkhead._bulkhead is None
        step.stop(consumer)
    get_settings.cache_clear()


def test_a_gevent_pool_worker_has_a_bulkhead(consumer, monkeypatch):
    """The gevent pool runs its tasks in this process (greenlets): their ends are counted as threads' are."""
    from celery.concurrency.gevent import TaskPool as GeventPool

    from worker.settings import get_settings

    monkeypatch.setenv("BULKHEAD_SHARE", "0.5")
    get_settings.cache_clear()
    monkeypatch.setattr(bulkhead, "_bulkhead", None)
    consumer.task_consumer.queues = [SimpleNamespace(name=q) for q in ("loops", "convertloop")]
    consumer.pool = GeventPool(limit=200)
    consumer.timer.call_repeatedly = lambda seconds, fun: SimpleNamespace(cancel=lambda: None)
    step = bulkhead.BulkheadStep(None)
    try:
        step.start(consumer)
        assert bulkhead._bulkhead is not None and bulkhead._bulkhead.limit == 100
    finally:
        step.stop(consumer)
        get_settings.cache_clear()


def test_without_an_event_loop_the_gate_wakes_the_consumer(consumer):
    """A green pool's consumer waits up to 2 s for messages before it runs what it was handed: each gate change
    from another thread or greenlet ends that wait (the transport's poller), and a pause's end goes through the
    consumer's loop too (the timer's greenlet never touches the consumer's queues itself)."""
    woken = []
    consumer.hub = None
    consumer.connection = SimpleNamespace(transport=SimpleNamespace(cycle=SimpleNamespace(
        wake=lambda: woken.append(1))))
    t = threading.Thread(target=gate.hold, args=("loops",))
    t.start()
    t.join()
    assert len(woken) == 1 and consumer.consuming("loops")
    consumer.run_soon()
    assert not consumer.consuming("loops")
    gate.release("loops")
    consumer.run_soon()
    assert len(woken) == 2 and consumer.consuming("loops")
    gate.pause("convertloop", 0.5)
    consumer.run_soon()
    assert not consumer.consuming("convertloop")
    fun, args = consumer.later.pop(0)
    fun(*args)                                   # the pause's end, in the timer's greenlet
    assert not consumer.consuming("convertloop") and len(woken) == 4
    consumer.run_soon()
    assert consumer.consuming("convertloop")
