"""The process's vendor HTTP: keep-alive connections per vendor host, one TLS context for all of them."""

from __future__ import annotations

import ssl

from worker import clients, http11
from worker.clients import VendorHTTP, _target


def test_every_connection_shares_one_tls_context_made_with_the_transport():
    """Making a TLS context loads the CA bundle (tens of ms under the GIL): an exchange must not pay it
    after its rate-limit slot, so it is made once, when the transport is, before any request."""
    transport = VendorHTTP()
    try:
        assert isinstance(transport._ssl, ssl.SSLContext)
        slots = transport._slots(_target("https://vendor.example/api"))
        a, b = slots.take(), slots.take()  # two exchanges at once: two connections
        assert a is not b
        assert a._ssl is transport._ssl and b._ssl is transport._ssl
        slots.give(a)
        slots.give(b)
    finally:
        transport.close()


def test_warm_means_an_exchange_with_that_host_ended_recently(monkeypatch):
    """Asked when a slot is reserved, for a later exchange: a pool busy now is back by then, so only the
    time since the last exchange with the host counts (its connection is kept KEEPALIVE_EXPIRY)."""
    now = [1000.0]
    monkeypatch.setattr(clients.time, "monotonic", lambda: now[0])

    class Answered(http11.Connection):
        def request(self, data, timeout, head_only=False):
            return http11.Reply(200, {}, "ok")

    class Answering(VendorHTTP):
        def _new_connection(self, origin):
            return Answered(origin, self._ssl)

    url = "https://vendor.example/api"
    with Answering() as http:
        assert not http.warm(url)  # no exchange yet: the first one connects
        slots = http._slots(_target(url))
        held = slots.take()
        assert not http.warm(url)  # a connection made (and busy), but no exchange ended yet
        slots.give(held)
        assert http.exchange("POST", url + "/events", {}, {}, {}).text == "ok"
        assert http.warm(url) and http.warm(url + "/other") and not http.warm("https://other.example/")
        now[0] += clients.KEEPALIVE_EXPIRY / 2 - 0.01
        assert http.warm(url)
        now[0] += 0.02
        assert not http.warm(url)  # its connection may be expiring: count the next request as cold

