"""The pytest plugin of vendor-delivery-worker: the ``vdw_events`` fixture (docs/testing.md).

Registered through the ``pytest11`` entry point, so pytest imports this module at start-up in every project
installed next to this package. It therefore imports nothing of the product (no Celery, kombu or redis, no
settings read before a test's own setup): :mod:`worker.testing` is imported when a test asks for the fixture.
It is a top-level module, not ``worker.testing`` itself, because importing anything under ``worker`` runs
``worker/__init__.py``, which loads Celery (Hypothesis keeps its plugin apart for the same reason).

Example::

    def test_signup(client, vdw_events):
        client.post("/signup", json={"email": "jill@acme.co"})
        vdw_events.assert_tracked("signed_up", email="jill@acme.co")

    @pytest.mark.vdw_recorder(vendors=["loops"], loops_mailing_lists={"vip": "cl123"})
    def test_only_loops(client, vdw_events): ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from worker.testing import Recorder


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vdw_recorder(vendors=None, **settings): how the vdw_events fixture's recorder is made "
        "(worker.testing.recorder's arguments)",
    )


@pytest.fixture
def vdw_events(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    """Producer calls (worker.identify/track/segment, worker.aio, worker.oncommit) validated as in production and
    recorded instead of published, every vendor pretending to be enabled; see worker.testing.Recorder."""
    from worker.testing import recorder

    marker = request.node.get_closest_marker("vdw_recorder")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
    with recorder(**kwargs) as events:
        yield events
