"""SQLAlchemy: publish a producer call when the session's transaction commits.

Each call takes the session first — a ``Session``, an ``AsyncSession`` or a
``scoped_session`` (Flask-SQLAlchemy's ``db.session``) — validates at once,
returns the event id at once, and waits on the session (``session.info``) until
its outermost transaction commits (SQLAlchemy's ``after_commit`` event). A
rollback drops it (``after_soft_rollback``): the whole transaction's calls, or
only those made inside a rolled-back savepoint (``begin_nested()``); so does
closing the session without committing. A call made before the session began a
transaction waits for the next commit.

After a plain ``Session`` commits, the calls publish blocking (bounded by
``PUBLISH_TIMEOUT``, like :func:`worker.track`). After an ``AsyncSession``
commits — on the event loop — they publish through :mod:`worker.aio`, awaited
by ``await session.commit()`` without blocking the loop.

Example::

    from worker.oncommit import sqlalchemy as events

    with Session(engine) as session, session.begin():
        session.add(User(email=email))
        events.track(session, "signed_up", email=email)   # the id now
    # published here, when session.begin()'s block commits; nothing if it raised
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, SessionTransaction, scoped_session

from ..producer import api as producer
from ..producer.api import Prepared
from . import asend_committed, send_committed

log = logging.getLogger(__name__)

#: ``session.info`` keys: the calls waiting for a commit, and whether the session's listeners are in place.
PENDING = "vdw.oncommit.pending"
LISTENING = "vdw.oncommit.listening"


def identify(session: Any, *, email: str | None = None, user_id: str | None = None, pid: str | None = None,
             traits: Mapping[str, Any] | None = None, vendors: Iterable[str] | None = None) -> str:
    """:func:`worker.identify`, published when ``session`` commits."""
    return defer(session, producer.prepare_identify(email=email, user_id=user_id, pid=pid, traits=traits,
                                                    vendors=vendors))


def track(session: Any, event: str, *, email: str | None = None, user_id: str | None = None,
          pid: str | None = None, properties: Mapping[str, Any] | None = None,
          occurred_at: datetime | str | None = None, vendors: Iterable[str] | None = None) -> str:
    """:func:`worker.track`, published when ``session`` commits."""
    return defer(session, producer.prepare_track(event, email=email, user_id=user_id, pid=pid,
                                                 properties=properties, occurred_at=occurred_at, vendors=vendors))


def segment(session: Any, *, email: str | None = None, user_id: str | None = None, pid: str | None = None,
            add: Iterable[str] = (), remove: Iterable[str] = (), vendors: Iterable[str] | None = None) -> str:
    """:func:`worker.segment`, published when ``session`` commits."""
    return defer(session, producer.prepare_segment(email=email, user_id=user_id, pid=pid, add=add, remove=remove,
                                                   vendors=vendors))


def defer(session: Any, prepared: Prepared) -> str:
    """Publish ``prepared`` when ``session`` next commits; returns its id."""
    sync = sync_session(session)
    if not sync.info.get(LISTENING):
        sa_event.listen(sync, "after_commit", _after_commit)
        sa_event.listen(sync, "after_soft_rollback", _after_soft_rollback)
        sa_event.listen(sync, "after_transaction_end", _after_transaction_end)
        sync.info[LISTENING] = True
    current = sync.get_nested_transaction() or sync.get_transaction()
    sync.info.setdefault(PENDING, []).append((current, prepared))
    return prepared.id


def pending(session: Any) -> list[Prepared]:
    """The calls waiting for ``session`` to commit."""
    return [p for _, p in sync_session(session).info.get(PENDING, [])]


def sync_session(session: Any) -> Session:
    """The ``Session`` behind a Session, an AsyncSession or a scoped_session."""
    if isinstance(session, scoped_session):
        session = session()
    session = getattr(session, "sync_session", session)  # AsyncSession (a scoped one gave us one above)
    if not isinstance(session, Session):
        raise TypeError(f"expected a SQLAlchemy Session, AsyncSession or scoped_session, not {type(session).__name__}")
    return session


# -- session events -------------------------------------------------------------


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint was released: its calls wait for the outermost commit
        return
    calls = [p for _, p in session.info.pop(PENDING, [])]
    if not calls:
        return
    if _in_greenlet():  # an AsyncSession committing on the event loop: publish without blocking it
        from sqlalchemy.util import await_only

        await_only(_asend_all(calls))
    else:
        for prepared in calls:
            send_committed(prepared)


async def _asend_all(calls: list[Prepared]) -> None:
    for prepared in calls:
        await asend_committed(prepared)


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    waiting = session.info.get(PENDING)
    if not waiting:
        return
    if previous_transaction.parent is None:
        _drop(session.info.pop(PENDING), "its transaction rolled back")
        return
    # A savepoint rolled back: drop the calls made inside it (or inside savepoints within it).
    _drop([(tx, p) for tx, p in waiting if _within(tx, previous_transaction)], "its savepoint rolled back")
    session.info[PENDING] = [(tx, p) for tx, p in waiting if not _within(tx, previous_transaction)]


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and session.info.get(PENDING):
        # The outermost transaction ended without a commit (closed, or rolled back: see above).
        _drop(session.info.pop(PENDING), "its session closed without committing")


def _drop(calls: list[tuple[Any, Prepared]], why: str) -> None:
    for _, prepared in calls:
        log.info("%s event %s dropped: %s", prepared.payload["operation"], prepared.id, why)


def _within(tx: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while tx is not None:
        if tx is ancestor:
            return True
        tx = tx.parent
    return False


def _in_greenlet() -> bool:
    """Is this code running in SQLAlchemy's asyncio bridge (so an event loop waits in this thread)?"""
    try:
        from sqlalchemy.util.concurrency import in_greenlet
    except ImportError:  # pragma: no cover - older SQLAlchemy 2.0
        try:
            import greenlet
        except ImportError:
            return False
        return bool(getattr(greenlet.getcurrent(), "__sqlalchemy_greenlet_provider__", False))
    return in_greenlet()
