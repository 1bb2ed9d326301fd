"""The vendor HTTP's network layer (:mod:`worker.sockets`): one write per request, timeouts set once, a kept-alive
connection the vendor closed is replaced, TLS with a private CA; against a real HTTP/1.1 server on loopback."""

from __future__ import annotations

import socket
import ssl
import threading

import httpcore
import httpx
import pytest

from tests.helpers import run_python
from worker.clients import VendorHTTP
from worker.dev.localstack import make_tls_files, wait_until
from worker.sockets import Stream, plain_poll

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
    """A socket that records what a stream does with it; ``fail`` maps a method name to what it raises."""

    def __init__(self, fail: dict[str, Exception] | None = None) -> None:
        self.calls: list[tuple] = []
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
        return b"answer"

    def fileno(self):
        return -1

    def close(self):
        self._call("close")


def test_a_request_leaves_in_one_write_and_timeouts_are_set_only_when_they_change():
    sock = Recorded()
    stream = Stream(sock, plain_poll())  # type: ignore[arg-type]
    for _ in range(2):  # two exchanges on the kept-alive connection
        stream.write(b"POST / HTTP/1.1\r\n\r\n", timeout=10.0)
        stream.write(b'{"a":1}', timeout=10.0)
        stream.write(b"", timeout=10.0)  # httpcore's end of a body with a length: nothing
        assert stream.read(65536, timeout=10.0) == b"answer"
    assert sock.calls == [("settimeout", 10.0), ("sendall", b'POST / HTTP/1.1\r\n\r\n{"a":1}'), ("recv", 65536),
                          ("sendall", b'POST / HTTP/1.1\r\n\r\n{"a":1}'), ("recv", 65536)]
    stream.read(10, timeout=2.0)
    assert sock.calls[-2:] == [("settimeout", 2.0), ("recv", 10)]


@pytest.mark.parametrize(("method", "error", "raised"), [
    ("sendall", TimeoutError("timed out"), httpcore.WriteTimeout),
    ("sendall", BrokenPipeError(32, "Broken pipe"), httpcore.WriteError),
    ("recv", TimeoutError("timed out"), httpcore.ReadTimeout),
    ("recv", ConnectionResetError(104, "reset"), httpcore.ReadError),
])
def test_failures_are_httpcore_s_write_and_read_errors(method, error, raised):
    stream = Stream(Recorded(fail={method: error}), plain_poll())  # type: ignore[arg-type]
    stream.write(b"GET / HTTP/1.1\r\n\r\n", timeout=1.0)
    with pytest.raises(raised):
        stream.read(100, timeout=1.0)


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
