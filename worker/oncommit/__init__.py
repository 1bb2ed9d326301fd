"""Enqueue after commit: a producer call made inside a database transaction is published when it commits.

A signup handler that creates a user and calls ``worker.track("signed_up", ...)``
must not tell the vendors about a user whose transaction then rolls back. The
helpers here take the same arguments as :mod:`worker.producer`, validate at once
(``InvalidEvent`` and ``ConfigurationError`` raise in the handler, as always),
return the event id at once, and publish when the transaction commits — or
drop the call if it rolls back:

- :mod:`worker.oncommit.django` — Django's ``transaction.on_commit``
  (outside ``atomic()``, in autocommit, they publish at once);
- :mod:`worker.oncommit.sqlalchemy` — SQLAlchemy session events; takes the
  ``Session`` (or ``AsyncSession``, ``scoped_session``) as first argument.

The transaction has committed when the publish runs, so a publish that fails
(``EnqueueError``: Redis away and the spool off, full or unwritable) is logged
as an ERROR naming the event instead of being raised from the commit.

Example::

    >>> from worker.oncommit import django as events                           # doctest: +SKIP
    >>> with transaction.atomic():                                             # doctest: +SKIP
    ...     user = User.objects.create(username="jill", email="jill@acme.co")
    ...     events.track("signed_up", email=user.email)  # the id now; published when the block commits
"""

from __future__ import annotations

import logging

from .. import aio
from ..producer import api as producer
from ..producer.api import Prepared

log = logging.getLogger(__name__)


def send_committed(prepared: Prepared) -> None:
    """Publish a call whose transaction committed; a failure is logged (the commit cannot be undone)."""
    try:
        producer.send(prepared)
    except Exception:  # noqa: BLE001 - logged with the event; raising would fail a request whose data is saved
        _log_failure(prepared)


async def asend_committed(prepared: Prepared) -> None:
    """:func:`send_committed` for a transaction committed on an event loop."""
    try:
        await aio.send(prepared)
    except Exception:  # noqa: BLE001
        _log_failure(prepared)


def _log_failure(prepared: Prepared) -> None:
    log.exception("%s event %s was committed with its transaction but could not be enqueued",
                  prepared.payload["operation"], prepared.id)
