"""Sentry: a local HTTP endpoint receives the envelopes a real worker sends.

That something was *not* reported is shown by a later report that was: the worker (one process, its delivery
threads sharing one Sentry client) sends its events one after the other from one queue, so an event captured
earlier reaches the stub before one captured later.
"""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import worker
from tests.helpers import wait_idle
from worker.dev.localstack import wait_until
from worker.sandbox import SANDBOX_CREDENTIALS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class SentryStub:
    """Collects every envelope item POSTed to /api/<project>/envelope/."""

    def __init__(self) -> None:
        self.items: list[tuple[dict, bytes]] = []
        self.raw: list[bytes] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding == "br":
                    import brotli  # only if sentry-sdk chose brotli

                    body = brotli.decompress(body)
                stub.raw.append(body)
                lines = body.split(b"\n")
                i = 1
                while i + 1 < len(lines):
                    header = json.loads(lines[i])
                    stub.items.append((header, lines[i + 1]))
                    i += 2
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.dsn = f"http://publickey@127.0.0.1:{self.server.server_address[1]}/1"

    def events(self) -> list[dict]:
        return [json.loads(payload) for header, payload in self.items if header.get("type") == "event"]


@pytest.fixture(scope="module")
def sentry(worker_factory, leak_watch):
    stub = SentryStub()
    worker_factory("sentry-w", SENTRY_DSN=stub.dsn)
    yield stub
    stub.server.shutdown()
    leak_watch.add_text("sentry envelopes", b"\n".join(stub.raw), kind="sentry")


def tags_of(event: dict) -> dict:
    return event["tags"] if isinstance(event["tags"], dict) else dict(event["tags"])


def test_retry_then_success_reports_nothing_and_dead_letter_reports_once(sentry, product_env, sandbox_client,
                                                                        unique_email):
    sandbox_client.configure("loops", fail_next=[503, 502])
    retried = worker.track("t", email=unique_email, vendors=["loops"])
    wait_until(lambda: sandbox_client.requests(vendor="loops", status=200), timeout=20,
               message="delivery after retries")
    wait_idle(product_env["REDIS_URL"])  # acknowledged: whatever its delivery reported was captured by now

    # A dead letter, reported: the first event to arrive is its own (a report of the retried delivery,
    # captured earlier, would have come first).
    sandbox_client.configure("conveyour", fail_next=[{"status": 422, "body": {"error": "bad"}}])
    dead = worker.identify(email=unique_email, vendors=["conveyour"])
    wait_until(lambda: sentry.events(), timeout=20, message="the Sentry event")
    event = sentry.events()[0]
    assert retried not in json.dumps(event), \
        f"a retried delivery must not be reported: {tags_of(event)} {event['exception']['values'][-1]['value']}"
    tags = tags_of(event)
    assert tags["vendor"] == "conveyour" and tags["status"] == "422" and tags["reason"] == "rejected"
    exc = event["exception"]["values"][-1]
    assert exc["type"] == "DeadLettered" and "conveyour" in exc["value"]
    assert dead in json.dumps(event)

    # Retries exhausted: four failed attempts, one dead letter, one event (not one per attempt).
    sandbox_client.configure("loops", fail_next=[500, 500, 500, 500])
    exhausted = worker.track("t2", email=unique_email, vendors=["loops"])
    wait_until(lambda: len(sentry.events()) >= 2, timeout=20, message="the second Sentry event")
    wait_idle(product_env["REDIS_URL"])  # dead-lettered and acknowledged: no attempt is left to make
    assert len([r for r in sandbox_client.requests(vendor="loops") if r["idempotency_key"] == exhausted]) == 4

    # A last dead letter as the marker: every report captured before it (a second report of either dead
    # letter, one per failed attempt) has arrived when its report has.
    sandbox_client.configure("conveyour", fail_next=[{"status": 422, "body": {"error": "bad"}}])
    marker = worker.identify(email=f"marker-{unique_email}", vendors=["conveyour"])
    wait_until(lambda: any(marker in json.dumps(e) for e in sentry.events()), timeout=20,
               message="the marker's Sentry event")
    first, second, last = sentry.events()  # exactly three: one per dead letter
    assert first == event
    tags = tags_of(second)
    assert tags["vendor"] == "loops" and tags["status"] == "500" and tags["reason"] == "retries_exhausted"
    assert exhausted in json.dumps(second)
    assert marker in json.dumps(last)
    everything = b"".join(sentry.raw).decode(errors="replace")
    secrets = [*SANDBOX_CREDENTIALS.values(), *product_env_secrets()]
    assert not [secret[:6] for secret in secrets if secret in everything]


def product_env_secrets() -> list[str]:
    from worker.settings import get_settings

    return get_settings().secrets()
