"""respx for the worker's vendor HTTP: routes that answer :meth:`worker.clients.VendorHTTP.exchange`.

The exchange is the worker's own HTTP/1.1 (:mod:`worker.http11`), not httpx's transports, so respx's default
mockers do not see it. :class:`ExchangeMocker` is a respx mocker (respx's public ``Mocker`` registry) that
patches the exchange itself: the request is the JSON body and headers as the exchange sends them, the answer
a :class:`~worker.http11.Reply`; an ``httpx`` exception a route raises comes out of the exchange as it would
from the wire. The connection code under it is tested against real servers (tests/unit/test_http11.py).

Example::

    >>> @vendor_http                                                                  # doctest: +SKIP
    ... def test_loops_answers_200(pipeline):
    ...     route = vendor_http.post("https://vendor.test/loops/events/send").respond(200, json={})
    ...     pipeline.deliver("loops", track(), attempt=1)
    ...     assert route.called
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import respx
from respx.mocks import AbstractRequestMocker

from worker.http11 import Reply


class ExchangeMocker(AbstractRequestMocker):
    name = "vdw-exchange"
    targets = ["worker.clients.VendorHTTP"]
    target_methods = ["exchange"]

    @classmethod
    def to_httpx_request(cls, **kwargs: Any) -> httpx.Request:
        body = json.dumps(kwargs["json"], ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        return httpx.Request(kwargs["method"], kwargs["url"], content=body,
                             headers={**kwargs["headers"], "Content-Type": "application/json"})

    @classmethod
    def from_sync_httpx_response(cls, httpx_response: httpx.Response, target: Any, **kwargs: Any) -> Reply:
        httpx_response.read()
        return Reply(httpx_response.status_code, {k.lower(): v for k, v in httpx_response.headers.items()},
                     httpx_response.text)


#: The router the unit tests decorate with (``@vendor_http``) and add routes to (``vendor_http.post(...)``).
vendor_http = respx.MockRouter(using=ExchangeMocker.name, assert_all_called=False)
