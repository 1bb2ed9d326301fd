"""Redis over TLS (``rediss://``) with a private CA: producer, worker and CLI all check the certificate.

A ``redis-server`` that speaks only TLS (``--port 0 --tls-port``) with a certificate signed by a CA made
for this module; ``REDIS_URL=rediss://127.0.0.1:P/0?ssl_cert_reqs=required&ssl_ca_certs=<ca>``. With the
CA of another authority in the URL every Redis user fails with the same clear reason, and the producer's
event is refused (EnqueueError), not spooled and not lost.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

import worker
from worker import clients
from worker.delivery.pipeline import Pipeline
from worker.dev.localstack import RedisServer, SentinelStack, make_tls_files, wait_until
from worker.errors import EnqueueError
from worker.producer.publisher import Publisher
from worker.settings import get_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: What every Redis user says when the certificate is not signed by the CA in REDIS_URL.
NOT_ACCEPTED = "TLS certificate was not accepted"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A TLS-only redis-server with our CA's certificate, and the files of another CA."""
    d = tmp_path_factory.mktemp("tls")
    server = RedisServer(tls=make_tls_files(d / "ours")).start()
    other = make_tls_files(d / "other", name="another")
    yield server, other
    server.stop()


def _point_producer_at(monkeypatch, url: str, spool_dir) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("SPOOL_DIR", str(spool_dir))
    for refresh in (get_settings.cache_clear, clients.reset, Pipeline.reset_default, Publisher.reset_default):
        refresh()


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(600)  # its own waits: about 250 s
def test_tls_redis_carries_producer_worker_and_cli(tls_redis, product_env, start_worker, sandbox_client,
                                                          unique_email, monkeypatch, tmp_path):
    server, _ = tls_redis
    # The port speaks TLS only: a plain client gets nowhere (so what follows really went over TLS).
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=server.port, socket_timeout=2).ping()

    w = start_worker("tls", REDIS_URL=server.url)
    _point_producer_at(monkeypatch, server.url, tmp_path / "spool")
    tag = unique_email.split("@")[0]
    emails = {f"{i}-{unique_email}" for i in range(10)}
    for email in emails:
        worker.track("tls_probe", email=email, properties={"tag": tag}, vendors=["convertloop", "loops"])
    assert Publisher.default().spool.pending() == 0, "an event was spooled: the producer could not reach Redis"

    def delivered(vendor: str) -> set[str]:
        body_email = (lambda b: b["person"]["email"]) if vendor == "convertloop" else (lambda b: b["email"])
        return {body_email(r["body"]) for r in sandbox_client.requests(vendor=vendor)
                if r["status"] == 200 and tag in json.dumps(r["body"])}

    for vendor in ("convertloop", "loops"):
        wait_until(lambda v=vendor: delivered(v) >= emails, timeout=45, message=f"every event at {vendor} "
                                                                                f"(worker log: {w.log_path})")

    env = {**product_env, "REDIS_URL": server.url}
    check = _run(env, "-m", "worker", "check")
    assert check.returncode == 0 and check.stdout.startswith("ok: rediss://127.0.0.1:"), check.stderr
    status = _run(env, "-m", "worker", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["vendors"]["loops"]["dead_letters"] == {}
    print(f"\nover TLS: {len(emails)} events x 2 vendors delivered; CLI: {check.stdout.strip()}")


def test_a_wrong_ca_fails_clearly_everywhere_and_loses_nothing(tls_redis, product_env, start_worker,
                                                               unique_email, monkeypatch, tmp_path):
    server, other = tls_redis
    wrong = server.url.replace(server.tls.ca, other.ca)
    assert wrong != server.url

    # The producer: the call raises, saying why; nothing was spooled and nothing reached Redis.
    _point_producer_at(monkeypatch, wrong, tmp_path / "spool")
    with pytest.raises(EnqueueError) as info:
        worker.track("tls_probe", email=unique_email, vendors=["convertloop"])
    assert NOT_ACCEPTED in str(info.value) and "ssl_ca_certs" in str(info.value), info.value
    assert Publisher.default().spool.pending() == 0
    right = server.client()
    assert not any(unique_email.encode() in raw for raw in right.lrange("convertloop", 0, -1))

    # The CLI: exit status 2 and the reason.
    env = {**product_env, "REDIS_URL": wrong}
    status = _run(env, "-m", "worker", "status")
    assert status.returncode == 2 and NOT_ACCEPTED in status.stderr, (status.returncode, status.stderr)

    # A worker: stops at startup with the reason, instead of retrying forever.
    with pytest.raises(RuntimeError) as started:
        start_worker("tls-wrong-ca", REDIS_URL=wrong)
    assert "configuration error" in str(started.value) and NOT_ACCEPTED in str(started.value), started.value
    print(f"\nwrong CA: producer raised EnqueueError (nothing spooled); CLI exit 2; worker stopped: "
          f"{status.stderr.strip()[:200]}")


@pytest.mark.timeout(600)  # its own waits: about 260 s
def test_sentinels_over_tls(tls_redis, product_env, start_worker, sandbox_client, unique_email, monkeypatch,
                            tmp_path):
    """sentinels://: TLS to the Sentinels and to the master they name, with the same private CA."""
    _, other = tls_redis
    stack = SentinelStack(tls=make_tls_files(tmp_path / "ca")).start()
    w = None
    try:
        w = start_worker("tls-sentinel", **stack.env)
        _point_producer_at(monkeypatch, stack.url, tmp_path / "spool")
        monkeypatch.setenv("REDIS_SENTINEL_MASTER", stack.master_name)
        get_settings.cache_clear()
        emails = {f"{i}-{unique_email}" for i in range(5)}
        for email in emails:
            worker.track("tls_sentinel_probe", email=email, vendors=["convertloop"])
        assert Publisher.default().spool.pending() == 0, "an event was spooled: the producer could not reach Redis"
        wait_until(lambda: emails <= {r["body"]["person"]["email"]
                                      for r in sandbox_client.requests(vendor="convertloop") if r["status"] == 200},
                   timeout=45, message=f"every event (log: {w.log_path})")

        env = {**product_env, **stack.env}
        check = _run(env, "-m", "worker", "check")
        assert check.returncode == 0 and "(TLS) at 127.0.0.1:" in check.stdout, check.stderr
        wrong = _run({**env, "REDIS_URL": stack.url.replace(stack.tls.ca, other.ca)}, "-m", "worker", "check")
        assert wrong.returncode == 2 and "the Sentinel at 127.0.0.1:" in wrong.stderr \
            and NOT_ACCEPTED in wrong.stderr, (wrong.returncode, wrong.stderr)
        print(f"\nsentinels:// {len(emails)} events delivered; CLI: {check.stdout.strip()}; wrong CA: "
              f"{wrong.stderr.strip()[:160]}")
    finally:
        if w is not None:
            w.stop()  # before its Redis goes: a warm shutdown without Redis waits for its timeout
        stack.stop()
