"""``worker.aio`` reaches Redis wherever the blocking API does: over TLS, through Sentinels (across a failover),
with ``PUBLISH_WAIT_REPLICAS``; a TLS certificate that is not accepted is an EnqueueError, not a spool entry."""

from __future__ import annotations

import asyncio
import json

import pytest

import worker
from worker import clients
from worker.dev.localstack import RedisServer, SentinelStack, make_tls_files, wait_until
from worker.envelope import decode_body
from worker.producer.publisher import Publisher
from worker.settings import get_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _point_producer_at(monkeypatch, tmp_path, **env: str) -> Publisher:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SPOOL_DIR", str(tmp_path / "spool"))
    for refresh in (get_settings.cache_clear, clients.reset, Publisher.reset_default):
        refresh()
    return Publisher.default()


def _event_ids(client, queue: str = "convertloop") -> list[str]:
    out = []
    for raw in client.lrange(queue, 0, -1):
        (_vendor, event), _kw, _embed = decode_body(json.loads(raw))
        out.append(event["id"])
    return out


def _wait_calls(client) -> int:
    """How many WAIT commands the node has run."""
    return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


@pytest.fixture
def reset_publisher():
    yield
    Publisher.reset_default()
    get_settings.cache_clear()


def test_tls(product_env, monkeypatch, tmp_path, reset_publisher):
    server = RedisServer(tls=make_tls_files(tmp_path / "ours")).start()
    try:
        publisher = _point_producer_at(monkeypatch, tmp_path, REDIS_URL=server.url)
        event_id = asyncio.run(worker.aio.track("tls_probe", email="jill@acme.co", vendors=["convertloop"]))
        assert _event_ids(server.client()) == [event_id]

        other = make_tls_files(tmp_path / "other", name="another")
        publisher = _point_producer_at(monkeypatch, tmp_path, REDIS_URL=server.url.replace(server.tls.ca, other.ca))
        with pytest.raises(worker.EnqueueError, match="TLS certificate was not accepted"):
            asyncio.run(worker.aio.track("tls_probe", email="jill@acme.co", vendors=["convertloop"]))
        assert publisher.spool.pending() == 0, "a misconfiguration was spooled instead of raised"
    finally:
        server.stop()


def test_sentinel_with_wait_replicas(product_env, monkeypatch, tmp_path, reset_publisher):
    stack = SentinelStack().start()  # a master and one replica
    try:
        publisher = _point_producer_at(monkeypatch, tmp_path, **stack.env, PUBLISH_WAIT_REPLICAS="1")
        confirmed = asyncio.run(worker.aio.track("ha_probe", email="jill@acme.co", vendors=["convertloop"]))
        master = stack.nodes[stack.master_port()].client()
        replica = next(node for port, node in stack.nodes.items() if port != stack.master_port()).client()
        assert _event_ids(master) == [confirmed]
        assert _event_ids(replica) == [confirmed]
        # Queued because a replica confirmed it: the call sent Redis' WAIT (a replica this close would have the
        # event without one, so that it has it proves nothing about PUBLISH_WAIT_REPLICAS).
        assert _wait_calls(master) >= 1, "the call did not WAIT for a replica"
        assert publisher.spool.pending() == 0  # queued, not spooled

        # Two replicas asked for, one there: the master took it, and it is spooled as well (a duplicate is
        # possible, a loss is not).
        publisher = _point_producer_at(monkeypatch, tmp_path, **stack.env, PUBLISH_WAIT_REPLICAS="2")
        unconfirmed = asyncio.run(worker.aio.track("ha_probe", email="jill@acme.co", vendors=["convertloop"]))
        assert _event_ids(master)[0] == unconfirmed
        assert publisher.spool.pending() == 1
    finally:
        stack.stop()


def test_sentinel_failover(product_env, monkeypatch, tmp_path, reset_publisher):
    stack = SentinelStack().start()
    try:
        publisher = _point_producer_at(monkeypatch, tmp_path, **stack.env)
        first = asyncio.run(worker.aio.track("ha_probe", email="jill@acme.co", vendors=["convertloop"]))
        old = stack.master_port()
        assert _event_ids(stack.nodes[old].client()) == [first]

        stack.kill_master()
        new = stack.wait_failover(old)

        async def after_failover() -> list[str]:
            return [await worker.aio.track("ha_probe", email=f"u{i}@acme.co", vendors=["convertloop"])
                    for i in range(5)]

        later = asyncio.run(after_failover())
        # Each is on the new master: queued there, or spooled (the first, on the dead master's connection)
        # and published there by the flusher.
        wait_until(lambda: set(later) <= set(_event_ids(stack.nodes[new].client())) and not publisher.spool.pending(),
                   timeout=30, message="every call after the failover on the new master")
        assert first in _event_ids(stack.nodes[new].client())
    finally:
        stack.stop()
