"""The process's HTTP transport: one keep-alive pool per thread, one TLS context for all of them."""

from __future__ import annotations

import threading

import httpx

from worker.clients import PerThreadTransport


def _pool_of(transport: PerThreadTransport) -> httpx.HTTPTransport:
    got = transport._local.transport
    assert isinstance(got, httpx.HTTPTransport)
    return got


def test_each_thread_has_its_own_pool_and_all_share_one_tls_context():
    """Making a TLS context loads the CA bundle (tens of ms under the GIL): a thread's first request must not
    pay it after its rate-limit slot, so it is made once, with the transport."""
    transport = PerThreadTransport()
    pools = []

    def first_request() -> None:
        request = httpx.Request("GET", "http://127.0.0.1:9/")  # nothing listens on the discard port
        try:
            transport.handle_request(request)
        except httpx.ConnectError:
            pass
        pools.append(_pool_of(transport))

    threads = [threading.Thread(target=first_request) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len({id(p) for p in pools}) == 3 and transport.open_transports() == 3
        contexts = {id(p._pool._ssl_context) for p in pools}
        assert contexts == {id(transport._tls)}
    finally:
        transport.close()
