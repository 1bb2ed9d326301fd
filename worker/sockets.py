"""httpcore's network layer for vendor HTTP: a request in one write, timeouts set once, a check that never switches.

httpcore (httpx's transport layer) talks to sockets through a *network backend*, a public extension point
(``httpcore.ConnectionPool(network_backend=...)``). Its own sync backend makes, for every exchange on a
kept-alive connection, a ``poll`` (is the idle connection still open?), a ``settimeout`` (an ``ioctl``)
before every read and write, and one ``send`` for the request's head and another for its body; CPython adds a
``poll`` before each timed ``send`` and ``recv``. With httpcore's pool, which checks the idle connection twice,
that was eleven system calls per exchange (strace, 1,000 exchanges), each of which lets go of the GIL. On the
threads pool every one is a chance for the other threads (127 by default) and the consumer to take the GIL
first, and the delivery then waits for it back. With this backend and one connection per exchange
(:class:`worker.clients.Connection`) it is five: the check's ``poll``, one ``sendall`` of head and body
together, the ``recv`` of the answer, and CPython's ``poll`` before each of those two.

- **One write.** A stream keeps what httpcore writes until it reads: httpcore writes a request's head and
  body and then reads the answer, so they leave in one ``sendall`` (as ``http.client`` sends a small body
  with its head). A failure to send is raised by that read as httpcore's ``WriteError``/``WriteTimeout``.
- **Timeouts set once.** ``settimeout`` is called only when the timeout asked for changes (a connection's
  connect timeout, then the exchange's read/write timeout).
- **The keep-alive check never switches.** It is a ``poll`` with a 0 s timeout, made with the standard
  library's ``poll`` even on a gevent-patched worker: gevent's waits even 0 s in its hub, running every other
  ready greenlet first, between the rate limiter's admission of a request and its sending.

Example::

    >>> import httpcore
    >>> pool = httpcore.ConnectionPool(network_backend=Backend())
    >>> pool.request("GET", "http://127.0.0.1:1/")  # doctest: +SKIP
    Traceback (most recent call last):
    httpcore.ConnectError: [Errno 111] Connection refused
"""

from __future__ import annotations

import select
import socket
import ssl
import sys
from collections.abc import Callable, Iterable
from typing import Any

import httpcore

#: What a stream keeps unsent at most before it writes (a vendor request is a few KiB).
MAX_PENDING = 64 * 1024

_KEEP = object()  # "no timeout asked yet" (None is a real timeout: block)


def plain_poll() -> Callable[[], Any]:
    """The standard library's ``select.poll``, also on a gevent-patched process (gevent keeps the original)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("select"):
        return monkey.get_original("select", "poll")
    return select.poll


class Stream(httpcore.NetworkStream):
    """A connected socket (plain or TLS) as httpcore's connections use it."""

    def __init__(self, sock: socket.socket, poll: Callable[[], Any], timeout: Any = _KEEP) -> None:
        self._sock = sock
        self._poll = poll
        #: The timeout the socket has now (``_KEEP``: not known, set it at the first read or write).
        self._timeout: Any = timeout
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._write_timeout: float | None = None

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self._timeout:
            self._sock.settimeout(timeout)
            self._timeout = timeout

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        try:
            self._set_timeout(self._write_timeout)
            self._sock.sendall(data)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.WriteError(exc) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._pending.append(buffer)
        self._pending_size += len(buffer)
        self._write_timeout = timeout
        if self._pending_size >= MAX_PENDING:
            self._flush()

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._flush()
        try:
            self._set_timeout(timeout)
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.ReadError(exc) from exc

    def close(self) -> None:
        self._pending.clear()
        self._sock.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> Stream:
        try:
            self._set_timeout(timeout)
            sock = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname)
        except TimeoutError as exc:
            self.close()
            raise httpcore.ConnectTimeout(exc) from exc
        except OSError as exc:
            self.close()
            raise httpcore.ConnectError(exc) from exc
        return Stream(sock, self._poll, self._timeout)  # the TLS socket takes the plain one's timeout

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return self._readable()
        if info == "ssl_object":  # httpcore asks it for the protocol ALPN chose; an SSLSocket answers that too
            return self._sock if isinstance(self._sock, ssl.SSLSocket) else None
        if info == "socket":
            return self._sock
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        return None

    def _readable(self) -> bool:
        """Is there something to read (on an idle connection: the vendor closed it)? A 0 s poll: never blocks."""
        fd = self._sock.fileno()
        if fd < 0:
            return True  # closed: as httpcore's own check, readable (its next read returns the end)
        p = self._poll()
        p.register(fd, select.POLLIN)
        return bool(p.poll(0))


class Backend(httpcore.SyncBackend):
    """httpcore's sync backend (it connects, with ``TCP_NODELAY``), handing out :class:`Stream` s."""

    def __init__(self) -> None:
        self._poll = plain_poll()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> Stream:
        stream = super().connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                     socket_options=socket_options)
        return Stream(stream.get_extra_info("socket"), self._poll, timeout)  # connected with that timeout
