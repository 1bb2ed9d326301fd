"""Django: publish a producer call when the surrounding ``transaction.atomic()`` block commits.

Inside ``atomic()`` (or a view under ``ATOMIC_REQUESTS``) each call is validated at
once, returns its event id at once, and is published through
``transaction.on_commit`` — only if the outermost block commits; a rollback
(an exception out of ``atomic()``, a rolled-back savepoint) drops it. Outside a
transaction (autocommit) it publishes at once, like :func:`worker.track`.
``using=`` names the database alias, as ``on_commit`` does. These calls block
(bounded by ``PUBLISH_TIMEOUT``); an async view outside a transaction uses
:mod:`worker.aio`.

Example::

    from django.db import transaction
    from worker.oncommit import django as events

    with transaction.atomic():
        user = User.objects.create_user(username, email)
        events.identify(email=email, user_id=str(user.pk), traits={"first_name": first_name})
        events.track("signed_up", email=email, user_id=str(user.pk))
    # published here; nothing if create_user raised IntegrityError
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import partial
from typing import Any

from django.db import transaction

from ..producer import api as producer
from ..producer.api import Prepared
from . import send_committed


def identify(*, email: str | None = None, user_id: str | None = None, pid: str | None = None,
             traits: Mapping[str, Any] | None = None, vendors: Iterable[str] | None = None,
             using: str | None = None) -> str:
    """:func:`worker.identify`, published when the transaction on ``using`` commits."""
    return defer(producer.prepare_identify(email=email, user_id=user_id, pid=pid, traits=traits, vendors=vendors),
                 using)


def track(event: str, *, email: str | None = None, user_id: str | None = None, pid: str | None = None,
          properties: Mapping[str, Any] | None = None, occurred_at: datetime | str | None = None,
          vendors: Iterable[str] | None = None, using: str | None = None) -> str:
    """:func:`worker.track`, published when the transaction on ``using`` commits."""
    return defer(producer.prepare_track(event, email=email, user_id=user_id, pid=pid, properties=properties,
                                        occurred_at=occurred_at, vendors=vendors), using)


def segment(*, email: str | None = None, user_id: str | None = None, pid: str | None = None,
            add: Iterable[str] = (), remove: Iterable[str] = (), vendors: Iterable[str] | None = None,
            using: str | None = None) -> str:
    """:func:`worker.segment`, published when the transaction on ``using`` commits."""
    return defer(producer.prepare_segment(email=email, user_id=user_id, pid=pid, add=add, remove=remove,
                                          vendors=vendors), using)


def defer(prepared: Prepared, using: str | None = None) -> str:
    """Publish ``prepared`` when the current transaction commits (at once in autocommit); returns its id."""
    if not transaction.get_connection(using).in_atomic_block:
        return producer.send(prepared)  # nothing to wait for; EnqueueError reaches the caller
    transaction.on_commit(partial(send_committed, prepared), using=using)
    return prepared.id
