"""The vendor HTTP (:mod:`worker.http11`, through :class:`worker.clients.VendorHTTP`): one write per request,
timeouts set once, a kept-alive connection the vendor closed is replaced, TLS with a private CA, against real
HTTP/1.1 servers on loopback; answers framed as RFC 9112 says, with h11 (httpx's own parser) as the oracle."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import h11
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import run_python
from worker import http11
from worker.clients import VendorHTTP
from worker.dev.localstack import make_tls_files, wait_until
from worker.http11 import Connection, Origin, Reply, _read_reply, encode_request

TIMEOUT = {"connect": 5.0, "read": 10.0, "write": 10.0, "pool": 10.0}


class Server:
    """HTTP/1.1 on loopback: answers each request 200 with its path; counts connections and requests.
    ``close_idle``: closes each connection after its answer, without saying so (as a vendor's idle timeout)."""

    def __init__(self, close_idle: bool = False, tls: ssl.SSLContext | None = None) -> None:
        self.close_idle = close_idle
        self.connections = 0
        self.closed = 0
        self.requests: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._tls = tls
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        except OSError:  # a client that refused the certificate, or went away
            conn.close()
        finally:
            self.closed += 1

    def _answer(self, conn: socket.socket) -> None:
        if self._tls is not None:
            conn = self._tls.wrap_socket(conn, server_side=True)
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buf) < length:
                    buf += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buf[:length])
                buf = buf[length:]
                path = head.split(b" ")[1]
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
                if self.close_idle:
                    return

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_exchanges_reuse_one_connection(server):
    with VendorHTTP() as http:
        for i in range(5):
            reply = http.exchange("POST", f"http://127.0.0.1:{server.port}/r{i}", {"X-N": str(i)}, {"n": i}, TIMEOUT)
            assert (reply.status, reply.text) == (200, f"/r{i}")
    assert server.connections == 1 and len(server.requests) == 5
    assert server.requests[4].endswith(b'\r\n\r\n{"n":4}') and b"X-N: 4" in server.requests[4]


def test_a_connection_the_vendor_closed_while_idle_is_replaced_not_failed():
    """The vendor closes each connection after its answer without saying so: every next exchange finds it
    readable (its end) when it takes it, and connects anew instead of failing on it."""
    server = Server(close_idle=True)
    try:
        with VendorHTTP() as http:
            for i in range(3):
                assert http.exchange("POST", f"http://127.0.0.1:{server.port}/c{i}", {}, {}, TIMEOUT).text == f"/c{i}"
                # the next exchange is to find the connection's end: the server has closed it first
                wait_until(lambda n=i + 1: server.closed == n, timeout=5, message="the server closed the connection")
        assert server.connections == 3
    finally:
        server.close()


def test_over_tls_with_a_private_ca(tmp_path):
    files = make_tls_files(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(files.cert, files.key)
    server = Server(tls=tls)
    try:
        http = VendorHTTP()
        http._ssl = ssl.create_default_context(cafile=files.ca)  # the transport's one context, trusting our CA
        with http:
            for i in range(3):
                assert http.exchange("POST", f"https://127.0.0.1:{server.port}/t{i}", {}, {"i": i}, TIMEOUT).text \
                    == f"/t{i}"
        assert server.connections == 1 and len(server.requests) == 3
        with VendorHTTP() as http, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            http.exchange("POST", f"https://127.0.0.1:{server.port}/x", {}, {}, TIMEOUT)  # certifi's CAs: refused
    finally:
        server.close()


class Recorded:
    """A socket that records what a connection does with it; ``fail`` maps a method name to what it raises."""

    def __init__(self, answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                 fail: dict[str, Exception] | None = None) -> None:
        self.calls: list[tuple] = []
        self.answer = answer
        self.fail = fail or {}

    def _call(self, name: str, *args):
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def settimeout(self, t):
        self._call("settimeout", t)

    def sendall(self, data):
        self._call("sendall", data)

    def recv(self, n):
        self._call("recv", n)
        return self.answer

    def fileno(self):
        return 99

    def close(self):
        self._call("close")


def on(sock: Recorded) -> Connection:
    """A connection that has ``sock`` already (connected, kept alive, not readable)."""
    conn = Connection(Origin("http", "vendor.test", 80), None, poll=NotReadable)
    conn._sock = sock  # type: ignore[assignment]
    conn._idle_since = time.monotonic()
    return conn


class NotReadable:
    def register(self, fd, events):
        pass

    def poll(self, timeout):
        return []


def test_a_request_leaves_in_one_write_and_timeouts_are_set_only_when_they_change():
    sock = Recorded()
    conn = on(sock)
    data = encode_request("POST", "/e", "vendor.test", {"Authorization": "Bearer k"}, b'{"a":1}')
    assert data == (b"POST /e HTTP/1.1\r\nHost: vendor.test\r\nAuthorization: Bearer k\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}")
    for _ in range(2):  # two exchanges on the kept-alive connection
        assert conn.request(data, {"read": 10.0, "write": 10.0}) == Reply(200, {"content-length": "2"}, "ok")
    assert sock.calls == [("settimeout", 10.0), ("sendall", data), ("recv", http11.READ_SIZE),
                          ("sendall", data), ("recv", http11.READ_SIZE)]
    conn.request(data, {"read": 2.0, "write": 10.0})  # another read timeout: set before the read
    assert sock.calls[-3:] == [("sendall", data), ("settimeout", 2.0), ("recv", http11.READ_SIZE)]
    conn.request(data, {"read": 2.0, "write": 10.0})  # and the write's again before the write
    assert sock.calls[-4:] == [("settimeout", 10.0), ("sendall", data), ("settimeout", 2.0), ("recv", http11.READ_SIZE)]


@pytest.mark.parametrize(("method", "error", "raised"), [
    ("sendall", TimeoutError("timed out"), httpx.WriteTimeout),
    ("sendall", BrokenPipeError(32, "Broken pipe"), httpx.WriteError),
    ("recv", TimeoutError("timed out"), httpx.ReadTimeout),
    ("recv", ConnectionResetError(104, "reset"), httpx.ReadError),
])
def test_failures_are_httpx_write_and_read_errors_and_close_the_connection(method, error, raised):
    sock = Recorded(fail={method: error})
    conn = on(sock)
    with pytest.raises(raised):
        conn.request(b"GET / HTTP/1.1\r\n\r\n", TIMEOUT)
    assert sock.calls[-1] == ("close",) and not conn.is_open()


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer key\r\nX-Injected: 1"},
    {"Authorization": "Bearer key\n"},
    {"Bad Name": "x"},
    {"X-Key": "clé"},
])
def test_a_header_that_would_not_be_one_header_is_refused_before_anything_is_sent(headers):
    with pytest.raises(httpx.LocalProtocolError) as refused:
        encode_request("POST", "/e", "vendor.test", headers, b"{}")
    assert "key" not in str(refused.value).replace("Bad Name", "")  # the value (a credential?) is not quoted


def answer(raw: bytes, segment: int = 7, head_only: bool = False) -> tuple[Reply, bool]:
    """What the connection reads from ``raw`` arriving ``segment`` bytes at a time, then the vendor's end."""
    parts = [raw[i:i + segment] for i in range(0, len(raw), segment)]

    class Sock:
        def recv(self, n):
            return parts.pop(0) if parts else b""

    return _read_reply(Sock(), head_only)  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "expected", "reusable"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", (200, "hello"), True),
    (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
     (201, "abcde"), True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", (200, "ok"), True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", (204, ""), True),
    (b"HTTP/1.1 200 OK\r\n\r\nto the end", (200, "to the end"), False),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", (200, "ok"), False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", (200, "ok"), False),
    (b"HTTP/1.1 503\r\nContent-Length: 2, 2\r\nRetry-After: 5\r\n\r\nno", (503, "no"), True),
    (b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\nContent-Length: 0\r\n\r\n", (200, ""), True),
    (b"HTTP/1.1 422 Unprocessable\r\nContent-Length: 3\r\n\r\n\xff\xfeA", (422, "\ufffd\ufffdA"), True),
])
@pytest.mark.parametrize("segment", [1, 7, 65536])
def test_answers_are_framed_as_rfc_9112_says(raw, expected, reusable, segment):
    reply, reused = answer(raw, segment)
    assert (reply.status, reply.text) == expected and reused is reusable


def test_bytes_that_came_after_the_answer_leave_the_connection_unused():
    """Nothing asked for them: the next answer is not read after them (the connection is not reused)."""
    reply, reusable = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", 65536)
    assert (reply.status, reply.text, reusable) == (200, "ok", False)


def test_header_names_are_lower_cased_and_repeated_ones_joined():
    reply, _ = answer(b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nX-A: 1\r\nx-a: 2\r\nX-Folded: a\r\n\tb\r\n"
                      b"Content-Length: 0\r\n\r\n")
    assert reply.headers == {"retry-after": "3", "x-a": "1, 2", "x-folded": "a b", "content-length": "0"}


def test_the_answer_to_a_head_request_has_no_body():
    reply, reusable = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", head_only=True)
    assert (reply.status, reply.text, reusable) == (200, "", True)


@pytest.mark.parametrize(("raw", "words"), [
    (b"", "without sending a response"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "middle of the answer's head"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "5 of 10 body bytes"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "middle of a chunked body"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "not a chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd", "does not end with CRLF"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nab", "not a length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "not a length"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "not a header line"),
    (b"HTTP/1.1 200 OK\r\nBad : x\r\n\r\n", "not a header line"),
    (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.1 status line"),
    (b"ICY 200 OK\r\n\r\n", "not an HTTP/1.1 status line"),
    (b"HTTP/1.1 20x OK\r\n\r\n", "not an HTTP/1.1 status line"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "switched protocols"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (http11.MAX_HEAD + 10), "over 65536 bytes"),
])
def test_an_answer_that_is_not_http_1_1_is_a_remote_protocol_error(raw, words):
    with pytest.raises(httpx.RemoteProtocolError, match=words):
        answer(raw, 1000)


_name = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).filter(
    lambda n: n not in ("content-length", "transfer-encoding", "connection") and not n.startswith("-"))
_value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)


@settings(max_examples=300, deadline=None)
@given(status=st.integers(200, 599).filter(lambda s: s not in (204, 304)),
       headers=st.lists(st.tuples(_name, _value), max_size=6, unique_by=lambda h: h[0]),
       body=st.binary(max_size=3000), chunks=st.lists(st.integers(1, 700), max_size=8),
       framing=st.sampled_from(["length", "chunked"]), segment=st.integers(1, 4096))
def test_any_answer_h11_writes_is_read_as_h11_reads_it(status, headers, body, chunks, framing, segment):
    """h11 (httpx's own HTTP/1.1) as the oracle: an answer it writes, split anywhere, reads the same here."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"POST /e HTTP/1.1\r\nHost: v\r\nContent-Length: 0\r\n\r\n")
    server.next_event(), server.next_event()
    framing_header = ((b"Content-Length", str(len(body)).encode()) if framing == "length"
                      else (b"Transfer-Encoding", b"chunked"))
    raw = server.send(h11.Response(status_code=status, headers=[*headers, framing_header]))
    pieces, rest = [], body
    for size in chunks:  # h11 writes each Data event as one chunk
        pieces.append(rest[:size])
        rest = rest[size:]
    for piece in [*pieces, rest]:
        if piece:
            raw += server.send(h11.Data(data=piece))
    raw += server.send(h11.EndOfMessage())
    reply, reusable = answer(raw, segment)
    expected = {k.lower(): v for k, v in headers} | {framing_header[0].decode().lower(): framing_header[1].decode()}
    assert (reply.status, reply.headers, reply.text, reusable) == (
        status, expected, body.decode("utf-8", errors="replace"), True)


def test_a_refused_connection_is_a_connect_error_and_the_next_exchange_connects_again(server):
    conn = Connection(Origin("http", "127.0.0.1", 1), None)
    with pytest.raises(httpx.ConnectError):
        conn.request(b"GET / HTTP/1.1\r\n\r\n", TIMEOUT)
    conn.origin = Origin("http", "127.0.0.1", server.port)
    data = encode_request("POST", "/again", f"127.0.0.1:{server.port}", {}, b"{}")
    assert conn.request(data, TIMEOUT) == Reply(200, {"content-length": "6"}, "/again")


def test_a_connection_kept_past_its_expiry_is_replaced(server):
    conn = Connection(Origin("http", "127.0.0.1", server.port), None, keepalive_expiry=0.0)
    data = encode_request("POST", "/x", f"127.0.0.1:{server.port}", {}, b"{}")
    for _ in range(3):
        assert conn.request(data, TIMEOUT).text == "/x"
    assert server.connections == 3 and len(server.requests) == 3


SILENT_VENDOR = r'''
import json, socket
if GEVENT:
    from gevent import monkey
    monkey.patch_all()
import httpx
from worker.clients import VendorHTTP

listener = socket.create_server(("127.0.0.1", 0))  # never accepts: the kernel completes the handshake, no answer
port = listener.getsockname()[1]
got = {}
with VendorHTTP() as http:
    try:  # no timeout but the read's: a read that ignored it would wait forever
        http.exchange("POST", f"http://127.0.0.1:{port}/x", {}, {"a": 1},
                      {"connect": None, "read": 0.2, "write": None, "pool": None})
        got["read"] = "answered"
    except httpx.HTTPError as exc:
        got["read"] = type(exc).__name__
print(json.dumps(got))
'''


@pytest.mark.parametrize("pool", ["threads", "gevent"])
def test_a_vendor_that_never_answers_is_a_read_timeout_on_either_pool(pool):
    """The exchange's read timeout holds on a plain socket and on a gevent-patched one (gevent keeps its own
    timeouts): the delivery gets httpx's ReadTimeout, an attempt to retry, instead of waiting forever."""
    got = run_python(f"GEVENT = {pool == 'gevent'}\n" + SILENT_VENDOR)
    assert got == {"read": "ReadTimeout"}, got


def test_a_request_past_its_slots_deadline_is_not_sent_and_the_connection_stays_usable(server):
    """``send_by`` is checked with the request encoded and its connection in hand: past it, nothing is written
    (the vendor sees no request) and SlotMissed says so; the next exchange goes out on the same connection."""
    import time

    from worker.clients import SlotMissed

    url = f"http://127.0.0.1:{server.port}"
    with VendorHTTP() as http:
        assert http.exchange("POST", f"{url}/first", {}, {}, TIMEOUT, send_by=time.monotonic() + 60).text == "/first"
        with pytest.raises(SlotMissed, match="past its rate-limit slot"):
            http.exchange("POST", f"{url}/late", {}, {"n": 1}, TIMEOUT, send_by=time.monotonic() - 0.001)
        assert http.exchange("POST", f"{url}/again", {}, {}, TIMEOUT).text == "/again"
    assert [r.split(b" ")[1] for r in server.requests] == [b"/first", b"/again"]
    assert server.connections == 1
