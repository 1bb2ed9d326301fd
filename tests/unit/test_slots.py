"""worker/slots.py: reusable slots, made only when none is idle, at most ``keep`` idle; and the HTTP transport
that takes one per exchange (worker/clients.py)."""

from __future__ import annotations

import threading

import httpx
import pytest

from worker.clients import PerThreadTransport
from worker.slots import Slots


class Made:
    """A factory that numbers what it makes and records what is closed."""

    def __init__(self) -> None:
        self.made: list[int] = []
        self.closed: list[int] = []

    def make(self) -> int:
        self.made.append(len(self.made))
        return self.made[-1]

    def close(self, item: int) -> None:
        self.closed.append(item)


def test_a_slot_given_back_is_reused_the_last_one_first():
    m = Made()
    s = Slots(m.make, m.close, keep=4)
    a, b = s.take(), s.take()
    assert (a, b) == (0, 1) and s.out() == 2 and s.idle() == 0
    s.give(a)
    s.give(b)
    assert s.take() == 1 and s.take() == 0  # the warmest first
    assert m.made == [0, 1] and m.closed == []


def test_at_most_keep_stay_idle_the_rest_are_closed():
    m = Made()
    s = Slots(m.make, m.close, keep=1)
    items = [s.take() for _ in range(3)]
    for item in items:
        s.give(item)
    assert s.idle() == 1 and m.closed == [1, 2]


def test_a_broken_slot_is_closed_and_a_failed_block_closes_its_slot():
    m = Made()
    s = Slots(m.make, m.close, keep=4)
    s.give(s.take(), broken=True)
    assert m.closed == [0] and s.idle() == 0
    with pytest.raises(RuntimeError), s.slot():
        raise RuntimeError("boom")
    assert m.closed == [0, 1] and s.out() == 0
    with s.slot() as item:
        assert item == 2
    assert s.idle() == 1


def test_a_factory_that_fails_takes_nothing():
    def fail() -> int:
        raise OSError("no")

    s: Slots[int] = Slots(fail, lambda item: None, keep=1)
    with pytest.raises(OSError):
        s.take()
    assert s.out() == 0


def test_close_closes_the_idle_slots_and_the_others_when_given_back():
    m = Made()
    s = Slots(m.make, m.close, keep=4)
    a, b = s.take(), s.take()
    s.give(a)
    s.close()
    assert m.closed == [0]
    s.give(b)
    assert m.closed == [0, 1]
    with pytest.raises(RuntimeError):
        s.take()


def test_threads_make_no_more_slots_than_ran_at_once():
    m = Made()
    s = Slots(m.make, m.close, keep=100)
    n, rounds = 8, 200
    barrier = threading.Barrier(n)

    def work() -> None:
        barrier.wait()
        for _ in range(rounds):
            with s.slot():
                pass

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= len(m.made) <= n and s.out() == 0 and s.idle() == len(m.made) and m.closed == []


def test_greenlets_each_new_share_the_slots_of_those_before():
    """The gevent pool runs every task in a new greenlet: the slots made for the first wave serve the next."""
    gevent = pytest.importorskip("gevent")
    m = Made()
    s = Slots(m.make, m.close, keep=100)

    def task() -> None:
        with s.slot():
            gevent.sleep(0.001)  # a switch while the slot is out (as an HTTP exchange)

    for _ in range(3):
        gevent.joinall([gevent.spawn(task) for _ in range(20)])
    assert len(m.made) == 20 and s.idle() == 20 and s.out() == 0


class Body(httpx.SyncByteStream):
    """A response body read as it comes, as httpx's own transport gives it."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self):
        yield self.data


class Counting(PerThreadTransport):
    """The product's transport over httpx's MockTransport (streamed bodies): counts the transports it makes."""

    def __init__(self, buffered: bool = False) -> None:
        super().__init__(keep=2)
        self.made = 0
        self.buffered = buffered

    def _new_transport(self) -> httpx.BaseTransport:
        self.made += 1
        if self.buffered:  # a transport that reads the body in full before returning
            return httpx.MockTransport(lambda request: httpx.Response(200, text=request.url.host))
        return httpx.MockTransport(lambda request: httpx.Response(200, stream=Body(request.url.host.encode())))


def test_the_http_transport_takes_a_transport_per_exchange_per_host_and_gives_it_back_when_closed():
    t = Counting()
    for _ in range(3):  # one after the other: one transport, reused
        r = t.handle_request(httpx.Request("GET", "http://a.example/x"))
        r.read()
        r.close()
    assert t.made == 1 and t.open_transports() == 1
    held = t.handle_request(httpx.Request("GET", "http://a.example/x"))
    other = t.handle_request(httpx.Request("GET", "http://a.example/y"))  # the first is still out
    assert t.made == 2
    held.close()
    other.close()
    t.handle_request(httpx.Request("GET", "http://b.example/x")).close()  # another host: its own
    assert t.made == 3 and t.open_transports() == 3
    for _ in range(2):
        t.handle_request(httpx.Request("GET", "http://a.example/x")).close()
    assert t.made == 3
    t.close()
    assert t.open_transports() == 0


def test_a_response_read_in_full_by_the_transport_gives_it_back_at_once():
    t = Counting(buffered=True)
    for _ in range(3):
        assert t.handle_request(httpx.Request("GET", "http://a.example/x")).read() == b"a.example"
    assert t.made == 1


def test_the_http_transport_gives_back_a_transport_whose_exchange_failed():
    class Failing(Counting):
        def _new_transport(self) -> httpx.BaseTransport:
            self.made += 1

            def fail(request: httpx.Request) -> httpx.Response:
                raise httpx.ConnectError("refused", request=request)

            return httpx.MockTransport(fail)

    t = Failing()
    for _ in range(3):
        with pytest.raises(httpx.ConnectError):
            t.handle_request(httpx.Request("GET", "http://a.example/x"))
    assert t.made == 1 and t.open_transports() == 1
