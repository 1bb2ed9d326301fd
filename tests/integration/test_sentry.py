"""Sentry: a local HTTP endpoint receives the envelopes a real worker sends."""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import worker
from worker.localstack import wait_until
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


def test_retry_then_success_reports_nothing_and_dead_letter_reports_once(sentry, product_env, sandbox_client,
                                                                        unique_email):
    sandbox_client.configure("loops", fail_next=[503, 502])
    retried = worker.track("t", email=unique_email, vendors=["loops"])
    wait_until(lambda: sandbox_client.requests(vendor="loops", status=200), timeout=20,
               message="delivery after retries")
    time.sleep(1.5)
    assert sentry.events() == [], f"a retried delivery must not be reported: {sentry.events()}"

    sandbox_client.configure("conveyour", fail_next=[{"status": 422, "body": {"error": "bad"}}])
    dead = worker.identify(email=unique_email, vendors=["conveyour"])
    wait_until(lambda: sentry.events(), timeout=20, message="the Sentry event")
    time.sleep(1.5)
    (event,) = sentry.events()
    tags = event["tags"] if isinstance(event["tags"], dict) else dict(event["tags"])
    assert tags["vendor"] == "conveyour" and tags["status"] == "422" and tags["reason"] == "rejected"
    exc = event["exception"]["values"][-1]
    assert exc["type"] == "DeadLettered" and "conveyour" in exc["value"]
    assert dead in json.dumps(event) and retried not in json.dumps(event)

    # Retries exhausted: four failed attempts, one dead letter, one event (not one per attempt).
    sandbox_client.configure("loops", fail_next=[500, 500, 500, 500])
    exhausted = worker.track("t2", email=unique_email, vendors=["loops"])
    wait_until(lambda: len(sentry.events()) >= 2, timeout=20, message="the second Sentry event")
    time.sleep(1.5)
    assert len([r for r in sandbox_client.requests(vendor="loops") if r["idempotency_key"] == exhausted]) == 4
    first, second = sentry.events()
    assert first == event
    tags = second["tags"] if isinstance(second["tags"], dict) else dict(second["tags"])
    assert tags["vendor"] == "loops" and tags["status"] == "500" and tags["reason"] == "retries_exhausted"
    assert exhausted in json.dumps(second)
    everything = b"".join(sentry.raw).decode(errors="replace")
    secrets = [*SANDBOX_CREDENTIALS.values(), *product_env_secrets()]
    assert not [secret[:6] for secret in secrets if secret in everything]


def product_env_secrets() -> list[str]:
    from worker.settings import get_settings

    return get_settings().secrets()
