"""Fixtures of the unit tests that talk to the test Redis."""

from __future__ import annotations

import uuid

import pytest
import redis


@pytest.fixture
def client(redis_server):
    """A client of the session's private Redis."""
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


@pytest.fixture
def prefix(client):
    """A key prefix of this test's own; its keys are deleted afterwards."""
    p = f"unit-{uuid.uuid4().hex[:8]}"
    yield p
    for key in client.scan_iter(f"{p}*"):
        client.delete(key)
