"""worker/slots.py: reusable slots, made only when none is idle, at most ``keep`` idle; and the HTTP transport
that takes one per exchange (worker/clients.py)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from worker.clients import VendorHTTP
from worker.http11 import Origin, Reply
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


class Sent:
    """A request as it went on the wire: request line, headers (as sent), body."""

    def __init__(self, data: bytes) -> None:
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("ascii").split("\r\n")
        self.method, self.target, self.version = lines[0].split(" ")
        self.headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
        self.host = dict(self.headers)["Host"]


class FakeConnection:
    """A connection that answers with ``answer(sent)`` (a :class:`~worker.http11.Reply`) and records closing."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.closed = False
        self.timeouts: list = []

    def request(self, data: bytes, timeout, head_only: bool = False) -> Reply:
        self.timeouts.append(timeout)
        return self.answer(Sent(data))

    def close(self) -> None:
        self.closed = True


def _host(sent: Sent) -> Reply:
    return Reply(200, {"x-seen": "yes"}, sent.host + "!")


class Counting(VendorHTTP):
    """The product's vendor HTTP over fake connections: counts the connections it makes."""

    def __init__(self, answer=_host) -> None:
        super().__init__(keep=2)
        self.made: list[FakeConnection] = []
        self.answer = answer

    def _new_connection(self, origin: Origin) -> FakeConnection:  # type: ignore[override]
        conn = FakeConnection(self.answer)
        self.made.append(conn)
        return conn


def test_the_vendor_http_takes_a_connection_per_exchange_per_host_and_gives_it_back():
    inside, go = threading.Event(), threading.Event()

    def answer(sent: Sent) -> Reply:
        if sent.target == "/slow":
            inside.set()
            assert go.wait(10)
        return _host(sent)

    t = Counting(answer)
    for _ in range(3):  # one after the other: one connection, reused
        assert t.exchange("POST", "http://a.example/x", {}, {}, {}).text == "a.example!"
    assert len(t.made) == 1 and t.open_transports() == 1
    slow = threading.Thread(target=t.exchange, args=("POST", "http://a.example/slow", {}, {}, {}))
    slow.start()
    assert inside.wait(10)
    t.exchange("POST", "http://a.example/y", {}, {}, {})  # the first connection is out: a second one
    assert len(t.made) == 2
    go.set()
    slow.join()
    t.exchange("POST", "http://b.example/x", {}, {}, {})  # another host: its own
    assert len(t.made) == 3 and t.open_transports() == 3
    for _ in range(2):
        t.exchange("POST", "http://a.example/x", {}, {}, {})
    assert len(t.made) == 3
    t.close()
    assert t.open_transports() == 0 and all(p.closed for p in t.made)


def test_an_exchange_sends_what_httpx_would():
    seen: list[Sent] = []

    def answer(sent: Sent) -> Reply:
        seen.append(sent)
        return Reply(429, {"retry-after": "3"}, "ét")

    t = Counting(answer)
    body = {"name": "ünïcode", "n": [1, 2.5, None]}
    reply = t.exchange("PUT", "https://vendor.example:8443/api/v1/x?a=1", {"Authorization": "Basic abc"}, body,
                       {"connect": 1.0})
    assert reply == (429, {"retry-after": "3"}, "ét")
    (sent,) = seen
    expected = httpx.Request("PUT", "https://vendor.example:8443/api/v1/x?a=1", json=body,
                             headers={"Authorization": "Basic abc"})
    assert (sent.method, sent.target, sent.version) == ("PUT", "/api/v1/x?a=1", "HTTP/1.1")
    assert json.loads(sent.body) == json.loads(expected.read()) == body
    assert {k.lower(): v for k, v in sent.headers} == {"host": "vendor.example:8443", "authorization": "Basic abc",
                                                        "content-type": "application/json",
                                                        "content-length": str(len(sent.body))}
    assert expected.headers["Host"] == "vendor.example:8443" and t.made[0].timeouts == [{"connect": 1.0}]


def test_a_failed_exchange_raises_httpx_s_error_and_gives_its_connection_back():
    def fail(sent: Sent) -> Reply:
        raise httpx.ConnectError("refused")

    t = Counting(fail)
    for _ in range(3):
        with pytest.raises(httpx.ConnectError, match="refused"):
            t.exchange("POST", "http://a.example/x", {}, {}, {})
    assert len(t.made) == 1 and t.open_transports() == 1


def test_a_url_that_is_not_http_is_a_request_that_cannot_be_made_in_httpx_s_words():
    with VendorHTTP() as http:
        with pytest.raises(httpx.UnsupportedProtocol, match="unsupported protocol 'ftp://'"):
            http.exchange("POST", "ftp://a.example/x", {}, {}, {})
        with pytest.raises(httpx.UnsupportedProtocol, match="missing an 'http://' or 'https://' protocol"):
            http.exchange("POST", "127.0.0.1:8900/loops/x", {}, {}, {})
        assert not http.warm("ftp://a.example/x")  # asked by the limiter: no exchange there, never an error
