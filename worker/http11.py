"""HTTP/1.1 for vendor requests: one kept-alive connection, a request in one write, the answer read in full.

A delivery's HTTP is always the same small exchange: a POST (or PUT) of a few hundred bytes of JSON to a fixed
path, and an answer read in full. On httpcore (httpx's transport layer, which the worker used until 2026-12-07)
that exchange cost about 215 µs of CPU on one thread (a loop of 3,000 against the sandbox), 40 % of it in h11's
general state machine and another 35 % in httpcore's request and connection models; a delivery needs none
of their generality. This module does the exchange in about 75 µs: the request's head and body in one
``sendall``, the answer's head split on CRLF, the body framed by RFC 9112 §6.3 (no body for HEAD, 1xx, 204
and 304; chunked; Content-Length; or read to the connection's end). What it does not need, it refuses with
a clear error instead of guessing: an answer head over :data:`MAX_HEAD` bytes, an ``Upgrade`` (101),
conflicting lengths, a header line without a colon. Errors are httpx's exceptions, as an httpx client
raises them (:class:`httpx.ConnectError`, :class:`httpx.ReadTimeout`, :class:`httpx.RemoteProtocolError`...),
so the pipeline's retry rules read the same.

- **Keep-alive.** A connection is reused while the vendor keeps it: not after ``Connection: close``, an
  HTTP/1.0 answer, a body read to the end, bytes beyond the answer, or any error; and not once it has been
  idle ``keepalive_expiry`` seconds. Before it is reused, one 0 s ``poll`` asks whether the vendor closed it
  while idle (its end is readable): then a new one is made instead of failing on it.
- **The check never switches.** That ``poll`` is the standard library's even on a gevent-patched worker:
  gevent waits even 0 s in its hub, running every other ready greenlet first, between the rate limiter's
  admission of a request and its sending. Reads and writes go through the socket as made, so under gevent
  they are gevent's and wait cooperatively.
- **Timeouts** are httpcore's: ``connect`` for the TCP and TLS handshakes, ``write`` for each send, ``read``
  for each read (not the whole answer). ``settimeout`` is called only when the timeout changes.
- **Headers are checked** before anything is sent: a name that is not a token, or a value with CR, LF or NUL
  (a credential pasted with its newline), is :class:`httpx.LocalProtocolError`, never a split request.

Example (a vendor that is not there)::

    >>> conn = Connection(Origin("http", "127.0.0.1", 1), None)
    >>> conn.request(encode_request("POST", "/events", "127.0.0.1:1", {}, b"{}"), TIMEOUT)
    Traceback (most recent call last):
    httpx.ConnectError: [Errno 111] Connection refused
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import httpx

#: Most bytes of an answer's status line and headers (a vendor's are a few hundred).
MAX_HEAD = 64 * 1024
#: Bytes asked of the socket per read.
READ_SIZE = 64 * 1024
#: A timeout for each phase, as :func:`worker.clients.request_timeout` makes it (seconds; None: block).
TIMEOUT: Mapping[str, float | None] = {"connect": 5.0, "read": 10.0, "write": 10.0, "pool": 10.0}

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\r\n\0]")
_KEEP = object()  # "no timeout set yet" (None is a real timeout: block)


class Reply(NamedTuple):
    """A vendor's answer, read in full: status, headers (names lower-cased), body as text."""

    status: int
    headers: dict[str, str]
    text: str


class Origin(NamedTuple):
    """Where a connection goes: ``scheme`` is ``"http"`` or ``"https"``."""

    scheme: str
    host: str
    port: int


def plain_poll() -> Callable[[], Any]:
    """The standard library's ``select.poll``, also on a gevent-patched process (gevent keeps the original)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("select"):
        return monkey.get_original("select", "poll")
    return select.poll


def encode_request(method: str, target: str, host: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """A request's head and body as they go on the wire, with ``Host``, ``Content-Type: application/json`` and
    ``Content-Length``; :class:`httpx.LocalProtocolError` for a header that would not be one header."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise httpx.LocalProtocolError(f"header {name!r}: not a valid header name, or its value has CR, LF "
                                           "or NUL")  # the value is not quoted: it may be a credential
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    try:
        head = "".join(lines).encode("ascii")
    except UnicodeEncodeError as exc:
        raise httpx.LocalProtocolError(f"a header is not ASCII (character {exc.start} of the head)") from None
    return head + body


class Connection:
    """One keep-alive connection to ``origin``, connected on its first request and again when it was closed.

    Not thread-safe: an exchange owns it while it runs (:class:`worker.clients.VendorHTTP` hands it out).
    """

    __slots__ = ("origin", "_ssl", "_expiry", "_poll", "_sock", "_timeout", "_idle_since")

    def __init__(self, origin: Origin, ssl_context: ssl.SSLContext | None, keepalive_expiry: float = 5.0,
                 poll: Callable[[], Any] | None = None) -> None:
        self.origin = origin
        self._ssl = ssl_context
        self._expiry = keepalive_expiry
        self._poll = poll or plain_poll()
        self._sock: socket.socket | None = None
        self._timeout: Any = _KEEP
        self._idle_since = 0.0

    def request(self, data: bytes, timeout: Mapping[str, float | None], head_only: bool = False) -> Reply:
        """Send ``data`` (:func:`encode_request`) and read the answer in full; ``head_only``: the request was a
        HEAD (its answer has no body). Any failure closes the connection and raises httpx's exception."""
        sock = self._sock
        if sock is not None and (time.monotonic() - self._idle_since > self._expiry or self._readable(sock)):
            self.close()  # kept too long, or closed by the vendor while idle
            sock = None
        if sock is None:
            sock = self._connect(timeout.get("connect"))
        try:
            try:
                self._set_timeout(sock, timeout.get("write"))
                sock.sendall(data)
            except TimeoutError as exc:
                raise httpx.WriteTimeout(str(exc)) from exc
            except OSError as exc:
                raise httpx.WriteError(str(exc)) from exc
            try:
                self._set_timeout(sock, timeout.get("read"))
                reply, reusable = _read_reply(sock, head_only)
            except TimeoutError as exc:
                raise httpx.ReadTimeout(str(exc)) from exc
            except OSError as exc:
                raise httpx.ReadError(str(exc)) from exc
        except BaseException:
            self.close()
            raise
        if reusable:
            self._idle_since = time.monotonic()
        else:
            self.close()
        return reply

    def is_open(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._timeout = _KEEP
        if sock is not None:
            try:
                sock.close()
            except OSError:  # pragma: no cover - closing a socket does not fail on Linux
                pass

    def _connect(self, timeout: float | None) -> socket.socket:
        scheme, host, port = self.origin
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                context = self._ssl if self._ssl is not None else httpx.create_ssl_context()
                sock = context.wrap_socket(sock, server_hostname=host)
        except TimeoutError as exc:
            sock.close()
            raise httpx.ConnectTimeout(str(exc)) from exc
        except OSError as exc:  # ssl.SSLError too (a certificate refused: CERTIFICATE_VERIFY_FAILED)
            sock.close()
            raise httpx.ConnectError(str(exc)) from exc
        self._sock, self._timeout = sock, timeout
        return sock

    def _set_timeout(self, sock: socket.socket, timeout: float | None) -> None:
        if timeout != self._timeout:
            sock.settimeout(timeout)
            self._timeout = timeout

    def _readable(self, sock: socket.socket) -> bool:
        """Is there something to read on the idle connection (the vendor closed it)? A 0 s poll: never blocks."""
        fd = sock.fileno()
        if fd < 0:
            return True
        p = self._poll()
        p.register(fd, select.POLLIN)
        return bool(p.poll(0))


def _read_reply(sock: socket.socket, head_only: bool) -> tuple[Reply, bool]:
    """Read one answer (skipping interim 1xx ones): the reply, and whether the connection may be reused."""
    recv = sock.recv
    buf = b""
    while True:  # one answer head per turn: interim (1xx) answers come before the final one
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > MAX_HEAD:
                raise httpx.RemoteProtocolError(f"the answer's head is over {MAX_HEAD} bytes")
            data = recv(READ_SIZE)
            if not data:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response." if not buf else
                                                "Server disconnected in the middle of the answer's head.")
            buf += data
            end = buf.find(b"\r\n\r\n", max(0, len(buf) - len(data) - 3))
        lines = buf[:end].decode("latin-1").split("\r\n")
        buf = buf[end + 4:]
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if version not in ("HTTP/1.1", "HTTP/1.0") or not (len(code) == 3 and code.isdigit()) \
                or rest[3:4] not in ("", " "):
            raise httpx.RemoteProtocolError(f"not an HTTP/1.1 status line: {lines[0][:100]!r}")
        status = int(code)
        if status >= 200:
            break
        if status == 101:
            raise httpx.RemoteProtocolError("the vendor switched protocols (101), which no request asked for")
    headers: dict[str, str] = {}
    last = ""
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if line[:1] in (" ", "\t") and last:  # an obsolete folded line: part of the header before it
            headers[last] += " " + line.strip()
            continue
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"not a header line: {line[:100]!r}")
        last = name.lower()
        value = value.strip(" \t")
        headers[last] = f"{headers[last]}, {value}" if last in headers else value
    reusable = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if head_only or status in (204, 304):
        body = b""
    elif "transfer-encoding" in headers:
        if headers["transfer-encoding"].lower().rsplit(",", 1)[-1].strip() == "chunked":
            body, buf = _chunked(recv, buf)
        else:  # another coding last: the body ends with the connection
            body, buf, reusable = _to_end(recv, buf), b"", False
    elif "content-length" in headers:
        lengths = {v.strip() for v in headers["content-length"].split(",")}
        length = lengths.pop() if len(lengths) == 1 else ""
        if not length.isdigit():
            raise httpx.RemoteProtocolError(f"Content-Length {headers['content-length'][:40]!r} is not a length")
        n = int(length)
        while len(buf) < n:
            data = recv(READ_SIZE)
            if not data:
                raise httpx.RemoteProtocolError(f"Server disconnected after {len(buf)} of {n} body bytes.")
            buf += data
        body, buf = buf[:n], buf[n:]
    else:  # no length: the body ends with the connection
        body, buf, reusable = _to_end(recv, buf), b"", False
    if buf:  # bytes beyond the answer: nothing asked for them; do not read the next answer after them
        reusable = False
    return Reply(status, headers, body.decode("utf-8", errors="replace")), reusable


def _to_end(recv: Callable[[int], bytes], buf: bytes) -> bytes:
    parts = [buf]
    while data := recv(READ_SIZE):
        parts.append(data)
    return b"".join(parts)


def _chunked(recv: Callable[[int], bytes], buf: bytes) -> tuple[bytes, bytes]:
    """A chunked body (RFC 9112 §7.1), and what was read after it."""
    parts: list[bytes] = []

    def more() -> bytes:
        data = recv(READ_SIZE)
        if not data:
            raise httpx.RemoteProtocolError("Server disconnected in the middle of a chunked body.")
        return data

    while True:
        while (eol := buf.find(b"\r\n")) < 0:
            if len(buf) > MAX_HEAD:
                raise httpx.RemoteProtocolError("a chunk size line is too long")
            buf += more()
        size_text = buf[:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise httpx.RemoteProtocolError(f"not a chunk size: {size_text[:20]!r}") from None
        buf = buf[eol + 2:]
        if size == 0:  # the last chunk; then trailer lines up to an empty one
            while True:
                while (eol := buf.find(b"\r\n")) < 0:
                    if len(buf) > MAX_HEAD:
                        raise httpx.RemoteProtocolError("the chunked body's trailers are too long")
                    buf += more()
                line, buf = buf[:eol], buf[eol + 2:]
                if not line:
                    return b"".join(parts), buf
        while len(buf) < size + 2:
            buf += more()
        if buf[size:size + 2] != b"\r\n":
            raise httpx.RemoteProtocolError("a chunk does not end with CRLF")
        parts.append(buf[:size])
        buf = buf[size + 2:]
