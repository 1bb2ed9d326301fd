"""Enqueue after commit: published when the transaction commits, dropped when it rolls back (Django, SQLAlchemy).

Against the session's private Redis: what is on the vendor queues is what was published. Publishing is
synchronous with the commit, so once a later commit has returned, a dropped call would already be there.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import redis
from sqlalchemy import Column, Integer, String, create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Session, scoped_session, sessionmaker

import worker
from worker.dev.localstack import free_port
from worker.envelope import decode_body
from worker.oncommit import sqlalchemy as sa_events
from worker.producer import api as producer
from worker.producer.publisher import Publisher
from worker.settings import get_settings
from worker.vendors import VENDORS


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id = Column(Integer, primary_key=True)
    email = Column(String, unique=True, nullable=False)


@pytest.fixture
def published(product_env, redis_server):
    """A function returning the event ids published so far (the ConvertLoop queue: every call goes there)."""
    client = redis.Redis.from_url(redis_server.url)
    client.delete(*VENDORS)

    def ids() -> list[str]:
        out = []
        for raw in reversed(client.lrange("convertloop", 0, -1)):
            (_vendor, event), _kwargs, _embed = decode_body(json.loads(raw))
            out.append(event["id"])
        return out

    yield ids
    client.delete(*VENDORS)
    client.close()


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


# -- SQLAlchemy -------------------------------------------------------------------


def test_sqlalchemy_calls_publish_when_the_session_commits(published, engine):
    with Session(engine) as session:
        with session.begin():
            session.add(User(email="jill@acme.co"))
            identify_id = sa_events.identify(session, email="jill@acme.co", traits={"plan": "pro"})
            track_id = sa_events.track(session, "signed_up", email="jill@acme.co")
            assert published() == [] and [p.id for p in sa_events.pending(session)] == [identify_id, track_id]
        assert published() == [identify_id, track_id]
        assert sa_events.pending(session) == []


def test_sqlalchemy_rollback_drops_the_calls(published, engine):
    with Session(engine) as session:
        with pytest.raises(RuntimeError), session.begin():
            session.add(User(email="jill@acme.co"))
            sa_events.track(session, "signed_up", email="jill@acme.co")
            raise RuntimeError("the handler failed after the call")
        session.add(User(email="jack@acme.co"))
        sa_events.track(session, "explicit", email="jack@acme.co")
        session.rollback()
        with session.begin():
            later = sa_events.track(session, "later", email="jack@acme.co")
    assert published() == [later]


def test_sqlalchemy_integrity_error_at_commit_drops_the_calls(published, engine):
    with Session(engine) as session, session.begin():
        session.add(User(email="jill@acme.co"))
    with Session(engine) as session:
        with pytest.raises(Exception, match="UNIQUE"), session.begin():
            session.add(User(email="jill@acme.co"))  # a duplicate: the flush at commit fails
            sa_events.track(session, "signed_up", email="jill@acme.co")
        with session.begin():
            later = sa_events.track(session, "later", email="jill@acme.co")
    assert published() == [later]


def test_sqlalchemy_savepoints(published, engine):
    with Session(engine) as session, session.begin():
        outer = sa_events.track(session, "outer", email="jill@acme.co")
        with pytest.raises(RuntimeError), session.begin_nested():
            sa_events.track(session, "in_rolled_back_savepoint", email="jill@acme.co")
            raise RuntimeError
        with session.begin_nested():
            kept = sa_events.track(session, "in_released_savepoint", email="jill@acme.co")
        assert published() == []  # a released savepoint waits for the outermost commit
    assert published() == [outer, kept]


def test_sqlalchemy_close_without_commit_drops_and_a_call_before_begin_waits(published, engine):
    session = Session(engine)
    sa_events.track(session, "never_committed", email="jill@acme.co")
    session.add(User(email="jill@acme.co"))
    session.close()  # the session can be used again: the call must not wait for its next commit
    early = sa_events.track(session, "before_any_transaction", email="jill@acme.co")
    session.add(User(email="jill@acme.co"))
    session.commit()
    session.close()
    assert published() == [early]


def test_sqlalchemy_scoped_session(published, engine):
    scoped = scoped_session(sessionmaker(engine))
    event_id = sa_events.track(scoped, "signed_up", email="jill@acme.co")
    scoped.add(User(email="jill@acme.co"))
    assert published() == []
    scoped.commit()
    scoped.remove()
    assert published() == [event_id]


def test_sqlalchemy_bad_input_raises_at_call_time(published, engine):
    with Session(engine) as session, session.begin():
        with pytest.raises(worker.InvalidEvent, match="event name"):
            sa_events.track(session, "", email="jill@acme.co")
        assert sa_events.pending(session) == []
    with pytest.raises(TypeError, match="Session"):
        sa_events.track(object(), "x", email="jill@acme.co")


def test_sqlalchemy_async_session_publishes_through_the_asyncio_api(published, tmp_path, monkeypatch):
    def blocking_publish(*args, **kwargs):
        raise AssertionError("an AsyncSession's commit published with the blocking API (it would block the loop)")

    monkeypatch.setattr(producer, "publish", blocking_publish)

    async def scenario() -> tuple[str, list[str]]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with AsyncSession(engine) as session:
            async with session.begin():
                session.add(User(email="jill@acme.co"))
                event_id = sa_events.track(session, "signed_up", email="jill@acme.co")
                before = published()
            # the commit awaited the publish
            after = published()
            with pytest.raises(RuntimeError):
                async with session.begin():
                    sa_events.track(session, "rolled_back", email="jill@acme.co")
                    raise RuntimeError
        await engine.dispose()
        return event_id, [*before, "|", *after]

    event_id, seen = asyncio.run(scenario())
    assert seen == ["|", event_id]
    assert published() == [event_id]


def test_sqlalchemy_a_publish_failing_after_commit_is_logged_not_raised(published, engine, monkeypatch, caplog):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("SPOOL_ENABLED", "false")
    get_settings.cache_clear()
    Publisher.reset_default()
    try:
        with caplog.at_level(logging.ERROR, logger="worker.oncommit"), Session(engine) as session:
            with session.begin():
                session.add(User(email="jill@acme.co"))
                event_id = sa_events.track(session, "signed_up", email="jill@acme.co")
            assert session.query(User).count() == 1  # committed
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and event_id in errors[0].getMessage()
        assert "SPOOL_ENABLED=false" in str(errors[0].exc_info[1])
    finally:
        Publisher.reset_default()


# -- Django -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def django_db():
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
                           INSTALLED_APPS=[], USE_TZ=True)
        django.setup()
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS signups (email TEXT UNIQUE)")
    yield connection
    connection.close()


def test_django_atomic_commit_publishes_on_exit(published, django_db):
    from django.db import transaction

    from worker.oncommit import django as dj_events

    with transaction.atomic():
        with django_db.cursor() as cursor:
            cursor.execute("INSERT INTO signups VALUES ('jill@acme.co')")
        identify_id = dj_events.identify(email="jill@acme.co", traits={"plan": "pro"})
        track_id = dj_events.track("signed_up", email="jill@acme.co")
        segment_id = dj_events.segment(email="jill@acme.co", add=["vip"])
        assert published() == []
    assert published() == [identify_id, track_id, segment_id]


def test_django_rollback_and_rolled_back_savepoints_drop_the_calls(published, django_db):
    from django.db import IntegrityError, transaction

    from worker.oncommit import django as dj_events

    with pytest.raises(IntegrityError), transaction.atomic():
        dj_events.track("duplicate_signup", email="dup@acme.co")
        with django_db.cursor() as cursor:
            cursor.execute("INSERT INTO signups VALUES ('dup@acme.co')")
            cursor.execute("INSERT INTO signups VALUES ('dup@acme.co')")
    with transaction.atomic():
        outer = dj_events.track("outer", email="jill@acme.co")
        with pytest.raises(RuntimeError), transaction.atomic():
            dj_events.track("in_rolled_back_savepoint", email="jill@acme.co")
            raise RuntimeError
    assert published() == [outer]


def test_django_autocommit_publishes_at_once_and_bad_input_raises(published, django_db):
    from worker.oncommit import django as dj_events

    event_id = dj_events.track("no_transaction", email="jill@acme.co")
    assert published() == [event_id]
    with pytest.raises(worker.InvalidEvent, match="identity"):
        dj_events.identify(traits={"a": 1})
