"""Task events for Flower go out in batches on either pool (worker/broker/taskevents.py), with Celery's dispatcher."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.events import EventDispatcher

from worker.broker import taskevents


class Hub:
    """What the step uses of kombu's event loop: callbacks run on the loop's thread, soon or later."""

    def __init__(self) -> None:
        self.soon: list = []
        self.later: list = []

    def call_soon(self, fun):
        self.soon.append(fun)

    def call_later(self, seconds, fun):
        self.later.append((seconds, fun))
        return SimpleNamespace(cancel=lambda: self.later.remove((seconds, fun)))

    def turn(self) -> None:
        """One turn of the loop: what was handed to it runs (not yet what is due later)."""
        while self.soon:
            self.soon.pop(0)()


class Timer:
    """What the step uses of the worker's timer on a green pool."""

    def __init__(self) -> None:
        self.later: list = []

    def call_after(self, seconds, fun):
        self.later.append((seconds, fun))
        return SimpleNamespace(cancel=lambda: None)


@pytest.fixture
def dispatcher():
    """Celery's own dispatcher, as the consumer makes it, publishing into a list instead of Redis."""
    app = Celery("t", broker="memory://", set_as_current=False)
    with app.connection_for_write() as conn:
        d = EventDispatcher(conn, hostname="w@h", app=app, enabled=True, buffer_group=None)
        published: list = []
        d._publish = lambda event, producer, routing_key, **kw: published.append((routing_key, event))
        d.published = published
        yield d
        d.close()


def events(published: list) -> list[str]:
    out = []
    for routing_key, body in published:
        out += [e["uuid"] for e in body] if routing_key == "task.multi" else [body["uuid"]]
    return out


def send(d: EventDispatcher, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        d.send("task-succeeded", uuid=str(i))


def started(dispatcher: EventDispatcher, hub: Hub | None = None, timer: Timer | None = None):
    """The step started on a consumer with that event loop (or, without one, that timer)."""
    c = SimpleNamespace(event_dispatcher=dispatcher, hub=hub, timer=timer)
    step = taskevents.TaskEventBatch(c)
    step.start(c)
    return c, step


def test_on_the_event_loop_events_wait_for_a_batch_or_a_tenth_of_a_second(dispatcher):
    hub = Hub()
    c, step = started(dispatcher, hub=hub)
    send(dispatcher, 3)
    assert len(hub.soon) == 1  # one flush scheduled for the batch, not one per event (Celery: one per event)
    hub.turn()
    assert [s for s, _ in hub.later] == [taskevents.EVENT_FLUSH] and dispatcher.published == []
    send(dispatcher, 2, start=3)
    hub.turn()
    assert len(hub.later) == 1 and dispatcher.published == []  # still the one flush
    hub.later.pop()[1]()
    assert dispatcher.published[0][0] == "task.multi" and events(dispatcher.published) == ["0", "1", "2", "3", "4"]
    send(dispatcher, 1, start=5)  # after a flush the next event schedules the next one
    hub.turn()
    assert len(hub.later) == 1
    step.stop(c)  # shutdown: what is buffered goes out, and the timer is cancelled
    assert events(dispatcher.published) == ["0", "1", "2", "3", "4", "5"] and hub.later == []


def test_a_full_batch_goes_out_at_once_and_nothing_is_lost(dispatcher):
    hub = Hub()
    c, step = started(dispatcher, hub=hub)
    send(dispatcher, taskevents.EVENT_BATCH + 5)
    assert len(dispatcher.published) == 1 and len(dispatcher.published[0][1]) == taskevents.EVENT_BATCH
    hub.turn()
    hub.later.pop()[1]()
    assert events(dispatcher.published) == [str(i) for i in range(taskevents.EVENT_BATCH + 5)]
    assert len(dispatcher.published) == 2
    step.stop(c)


def test_on_a_green_pool_the_workers_timer_flushes(dispatcher):
    timer = Timer()
    c, step = started(dispatcher, timer=timer)
    send(dispatcher, 4)
    assert [s for s, _ in timer.later] == [taskevents.EVENT_FLUSH] and dispatcher.published == []
    timer.later.pop()[1]()
    assert len(dispatcher.published) == 1 and events(dispatcher.published) == ["0", "1", "2", "3"]
    assert timer.later == []  # nothing sent since: the timer is not armed again (no wake-ups on an idle worker)
    send(dispatcher, 1, start=4)
    step.stop(c)
    assert events(dispatcher.published) == ["0", "1", "2", "3", "4"]


def test_events_off_the_step_does_nothing(dispatcher):
    dispatcher.enabled = False
    started(dispatcher, hub=Hub())
    assert dispatcher.on_send_buffered is None and dispatcher.buffer_group == frozenset()


def test_senders_do_not_queue_behind_a_flush_under_way_and_what_they_send_goes_out_in_one_batch(dispatcher):
    """While one flush writes to the socket, other senders that fill the buffer go on instead of waiting for the
    dispatcher's lock and each then publishing the few events that came in meanwhile (Celery's own behaviour)."""
    timer = Timer()
    c, step = started(dispatcher, timer=timer)
    record = dispatcher._publish
    writing, go = threading.Event(), threading.Event()

    def slow_write(event, producer, routing_key, **kw):
        writing.set()
        assert go.wait(60)  # the socket write under way
        record(event, producer, routing_key)

    dispatcher._publish = slow_write
    first = threading.Thread(target=send, args=(dispatcher, taskevents.EVENT_BATCH))
    first.start()
    assert writing.wait(60)
    more = threading.Thread(target=send, args=(dispatcher, taskevents.EVENT_BATCH + 2, taskevents.EVENT_BATCH))
    more.start()
    more.join(60)  # a deadlock guard only: returns at once unless the sender waits for the flush under way
    assert not more.is_alive()
    go.set()
    first.join(60)
    assert [len(body) for _, body in dispatcher.published] == [taskevents.EVENT_BATCH]
    timer.later.pop()[1]()  # the flush under way armed the timer for what came in during its write
    assert [len(body) for _, body in dispatcher.published] == [taskevents.EVENT_BATCH, taskevents.EVENT_BATCH + 2]
    assert events(dispatcher.published) == [str(i) for i in range(2 * taskevents.EVENT_BATCH + 2)]
    step.stop(c)
