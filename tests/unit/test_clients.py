"""The process's vendor HTTP: keep-alive pools per vendor host, one TLS context for all of them."""

from __future__ import annotations

import ssl

from worker.clients import VendorHTTP, _target


def test_every_pool_shares_one_tls_context_made_with_the_transport():
    """Making a TLS context loads the CA bundle (tens of ms under the GIL): an exchange must not pay it
    after its rate-limit slot, so it is made once, when the transport is, before any request."""
    transport = VendorHTTP()
    try:
        assert isinstance(transport._ssl, ssl.SSLContext)
        slots = transport._slots(_target("https://vendor.example/api"))
        a, b = slots.take(), slots.take()  # two exchanges at once: two pools
        assert a is not b
        assert a._ssl_context is transport._ssl and b._ssl_context is transport._ssl
        slots.give(a)
        slots.give(b)
    finally:
        transport.close()


def test_warm_means_an_idle_transport_for_that_host():
    transport = VendorHTTP()
    url = "https://vendor.example/api"
    try:
        assert not transport.warm(url)
        slots = transport._slots(_target(url))
        held = slots.take()
        assert not transport.warm(url)  # in use by another exchange: the next one opens its own
        slots.give(held)
        assert transport.warm(url) and not transport.warm("https://other.example/")
    finally:
        transport.close()
