"""worker.testing: producer calls validated as in production and recorded instead of published — blocking,
asyncio, after a Django or SQLAlchemy commit — with no Redis; finding and asserting them; the pytest plugin.

Every test runs with no vendor credentials and REDIS_URL at a closed port with the spool off, so a call that
escaped the recorder would raise EnqueueError instead of passing unnoticed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, String, create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Session, scoped_session, sessionmaker

import worker
import worker.testing
from worker.dev.localstack import VENDOR_ENV_PREFIXES, free_port
from worker.oncommit import sqlalchemy as sa_events
from worker.producer import api as producer
from worker.producer.publisher import Publisher
from worker.producer.publisher_async import AsyncPublisher
from worker.settings import get_settings
from worker.testing import FAKE_CREDENTIALS, Call
from worker.vendors import VENDORS

ROOT = Path(__file__).resolve().parents[2]
ALL = list(VENDORS)  # convertloop, loops, conveyour


@pytest.fixture(autouse=True)
def no_vendors_no_redis(monkeypatch, tmp_path):
    """No vendor credentials, Redis at a port nobody listens on, the spool off and in a directory of the test's."""
    for key in list(os.environ):
        if key.startswith(VENDOR_ENV_PREFIXES) or key in ("ALLOW_NO_VENDORS", "EVENT_PROPERTY_CAP"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("SPOOL_ENABLED", "false")
    monkeypatch.setenv("SPOOL_DIR", str(tmp_path / "spool"))
    get_settings.cache_clear()
    Publisher.reset_default()
    yield
    left = producer.recording
    producer.recording = None
    monkeypatch.undo()
    get_settings.cache_clear()
    Publisher.reset_default()
    assert left is None, "a recorder was left recording"


# -- recording ---------------------------------------------------------------------------------


def test_each_call_is_recorded_with_its_id_and_every_vendor_it_would_go_to():
    with worker.testing.recorder() as events:
        identify_id = worker.identify(email="jill@acme.co", user_id="u1", traits={"plan": "pro", "seats": 3})
        track_id = worker.track("signed_up", email="jill@acme.co", properties={"team": "acme"},
                                occurred_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2))))
        segment_id = worker.segment(pid="p1", add=["vip"], remove=["trial"])
    assert len(events) == 3
    identify, track, segment = events  # iteration: in call order
    assert identify == Call("identify", identify_id, {"email": "jill@acme.co", "user_id": "u1"}, ALL,
                            traits={"plan": "pro", "seats": 3})
    assert track == Call("track", track_id, {"email": "jill@acme.co"}, ALL, event="signed_up",
                         properties={"team": "acme"}, occurred_at="2026-01-02T01:04:05Z")
    # A pid alone: only ConvertLoop can carry it (as in production: Loops and ConveYour are skipped).
    assert segment == Call("segment", segment_id, {"pid": "p1"}, ["convertloop"], add=["vip"], remove=["trial"])
    assert events[1] is events.calls[1] and events[-1].id == segment_id
    assert (track.email, track.user_id, track.pid) == ("jill@acme.co", None, None)
    assert track.payload["id"] == track_id and track.payload["operation"] == "track" and track.payload["created_at"]
    assert len({identify_id, track_id, segment_id}) == 3


def test_bad_input_raises_what_production_raises_and_records_nothing(monkeypatch):
    cases = [
        lambda: worker.identify(traits={"a": 1}),                                   # no identity
        lambda: worker.track("", email="jill@acme.co"),                              # empty event name
        lambda: worker.track("x", email="not an email"),
        lambda: worker.track("x", email="jill@acme.co", properties={"s": {1, 2}}),  # not JSON
        lambda: worker.track("x", email="jill@acme.co", properties={f"k{i}": i for i in range(16)}),  # over the cap
        lambda: worker.segment(email="jill@acme.co"),                                # no segment
        lambda: worker.identify(email="jill@acme.co", vendors=["mailchimp"]),        # unknown vendor
        lambda: worker.segment(email="jill@acme.co", add=["vip"], vendors=["loops"]),  # no LOOPS_MAILING_LISTS entry
    ]
    with worker.testing.recorder() as events:
        messages = []
        for case in cases:
            with pytest.raises(worker.InvalidEvent) as raised:
                case()
            messages.append(str(raised.value))
    assert len(events) == 0
    # The same errors as with real credentials, outside any recorder.
    for key, value in {"CONVERTLOOP_APP_ID": "a", "CONVERTLOOP_API_KEY": "b", "LOOPS_API_KEY": "c",
                       "CONVEYOUR_APPKEY": "d", "CONVEYOUR_TOKEN": "e", "CONVEYOUR_BASE_URL": "https://c.example"}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    for case, message in zip(cases, messages, strict=True):
        with pytest.raises(worker.InvalidEvent) as raised:
            case()
        assert str(raised.value) == message


def test_every_vendor_pretends_to_be_enabled_unless_the_test_says_otherwise(monkeypatch):
    with pytest.raises(worker.ConfigurationError):
        worker.check_configuration()  # no credentials: outside a recorder the app would not start
    with worker.testing.recorder() as events:
        assert worker.check_configuration() == ALL
        worker.track("a", email="jill@acme.co")
    with worker.testing.recorder(vendors=["loops"]) as only_loops:
        assert worker.check_configuration() == ["loops"]
        worker.track("b", email="jill@acme.co")
        with pytest.raises(worker.InvalidEvent, match="'convertloop' is not enabled"):
            worker.track("c", email="jill@acme.co", vendors=["convertloop"])
    with worker.testing.recorder(vendors=[]) as none:
        with pytest.raises(worker.ConfigurationError, match="no vendor is enabled"):
            worker.track("d", email="jill@acme.co")
    monkeypatch.setenv("ALLOW_NO_VENDORS", "true")
    get_settings.cache_clear()
    with worker.testing.recorder(vendors=[]) as dropped:
        worker.track("e", email="jill@acme.co")
    assert [c.vendors for c in events] == [ALL]
    assert [c.vendors for c in only_loops] == [["loops"]]
    assert len(none) == 0 and [c.vendors for c in dropped] == [[]]


def test_the_environments_own_settings_are_kept_and_can_be_overridden(monkeypatch):
    monkeypatch.setenv("LOOPS_API_KEY", "the-real-one")
    monkeypatch.setenv("EVENT_PROPERTY_CAP", "2")
    monkeypatch.setenv("LOOPS_MAILING_LISTS", '{"vip": "cl_vip"}')
    get_settings.cache_clear()
    with worker.testing.recorder() as events:
        assert events.settings.loops_api_key.get_secret_value() == "the-real-one"
        assert events.settings.convertloop_api_key == FAKE_CREDENTIALS["convertloop"]["convertloop_api_key"]
        with pytest.raises(worker.InvalidEvent, match="at most 2"):
            worker.track("x", email="jill@acme.co", properties={"a": 1, "b": 2, "c": 3})
        worker.segment(email="jill@acme.co", add=["vip"])  # mapped: Loops takes it
        worker.segment(email="jill@acme.co", add=["trial"])  # not mapped: Loops is skipped
    assert [c.vendors for c in events] == [ALL, ["convertloop", "conveyour"]]
    with worker.testing.recorder(vendors=["convertloop"], loops_mailing_lists={"trial": "cl_trial"}) as events:
        assert events.settings.loops_api_key is None  # the environment's credentials, disabled by the test
        assert events.settings.loops_mailing_lists == {"trial": "cl_trial"}
    assert get_settings().loops_api_key.get_secret_value() == "the-real-one"  # the process's settings untouched
    with pytest.raises(TypeError, match="not a setting: loops_mailing_list"):
        worker.testing.recorder(loops_mailing_list={})
    with pytest.raises(ValueError, match="unknown vendor"):
        worker.testing.recorder(vendors=["mailchimp"])


def test_fake_credentials_cover_every_vendor():
    assert set(FAKE_CREDENTIALS) == set(VENDORS)
    for name in VENDORS:
        settings = worker.testing.pretend_settings([name])
        assert [v for v, vendor in VENDORS.items() if vendor.enabled(settings)] == [name]


def test_record_stop_clear_and_nesting():
    events = worker.testing.record()
    try:
        assert events.active and producer.recording is events
        first = worker.track("first", email="jill@acme.co")
        with worker.testing.recorder() as inner:  # the innermost recorder records
            worker.track("inner", email="jill@acme.co")
        worker.track("second", email="jill@acme.co")
        assert [c.event for c in events] == ["first", "second"] and [c.event for c in inner] == ["inner"]
        assert repr(events) == "<Recorder recording, 2 call(s)>"
        events.clear()
        assert len(events) == 0 and not events.tracked()
        worker.track("third", email="jill@acme.co")
        assert [c.event for c in events] == ["third"] and first not in [c.id for c in events]
    finally:
        events.stop()
    assert not events.active and producer.recording is None
    # Stopped: calls are the environment's again (here no vendor enabled) and are not recorded.
    with pytest.raises(worker.ConfigurationError):
        worker.track("after", email="jill@acme.co")
    assert [c.event for c in events] == ["third"]


def test_recording_never_touches_redis_nor_starts_the_spool_flusher(monkeypatch, tmp_path):
    connects: list[object] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def spy_connect(self, address):
        connects.append(address)
        return real_connect(self, address)

    def spy_connect_ex(self, address):
        connects.append(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", spy_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", spy_connect_ex)
    monkeypatch.setenv("SPOOL_ENABLED", "true")  # were anything published, it would be spooled here
    get_settings.cache_clear()
    loops_before = len(AsyncPublisher._by_loop)

    async def from_asyncio() -> list[str]:
        return [await worker.aio.identify(email="jill@acme.co"), await worker.aio.track("x", email="jill@acme.co"),
                await worker.aio.segment(email="jill@acme.co", add=["vip"])]

    with worker.testing.recorder() as events:
        ids = [worker.identify(email="jill@acme.co"), worker.track("x", email="jill@acme.co"),
               worker.segment(email="jill@acme.co", add=["vip"])]
        ids += asyncio.run(from_asyncio())
    assert [c.id for c in events] == ids and len(set(ids)) == 6
    assert connects == []  # no connect attempt: no publish timeout waited out either
    assert Publisher._default is None
    assert len(AsyncPublisher._by_loop) == loops_before
    assert not any(t.name == "vdw-spool-flusher" for t in threading.enumerate())
    assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").iterdir())


# -- asyncio and after commit -----------------------------------------------------------------


def test_asyncio_calls_are_recorded():
    async def handler() -> tuple[str, str, str]:
        with pytest.raises(worker.InvalidEvent, match="event name"):
            await worker.aio.track("", email="jill@acme.co")
        return (await worker.aio.identify(email="jill@acme.co", traits={"plan": "pro"}),
                await worker.aio.track("signed_up", email="jill@acme.co", properties={"team": "acme"}),
                await worker.aio.segment(user_id="u1", remove=["trial"]))

    with worker.testing.recorder() as events:
        identify_id, track_id, segment_id = asyncio.run(handler())
    assert [c.id for c in events.identified(traits={"plan": "pro"})] == [identify_id]
    assert [c.id for c in events.tracked("signed_up", properties={"team": "acme"})] == [track_id]
    assert [c.id for c in events.segmented(user_id="u1", remove=["trial"])] == [segment_id]
    assert len(events) == 3


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "testing_users"
    id = Column(Integer, primary_key=True)
    email = Column(String, unique=True, nullable=False)


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_sqlalchemy_a_committed_session_records_and_a_rolled_back_one_does_not(engine):
    with worker.testing.recorder() as events:
        with Session(engine) as session:
            with session.begin():
                session.add(User(email="jill@acme.co"))
                committed = sa_events.track(session, "signed_up", email="jill@acme.co")
                assert len(events) == 0  # not before the commit
            assert [c.id for c in events] == [committed]
            with pytest.raises(RuntimeError), session.begin():
                sa_events.track(session, "rolled_back", email="jill@acme.co")
                raise RuntimeError
            session.add(User(email="jack@acme.co"))
            sa_events.identify(session, email="jack@acme.co", traits={"x": 1})
            session.rollback()
            with session.begin():
                outer = sa_events.track(session, "outer", email="jill@acme.co")
                with pytest.raises(RuntimeError), session.begin_nested():
                    sa_events.track(session, "in_rolled_back_savepoint", email="jill@acme.co")
                    raise RuntimeError
        with pytest.raises(Exception, match="UNIQUE"), Session(engine) as session, session.begin():
            session.add(User(email="jill@acme.co"))  # a duplicate: the commit fails and rolls back
            sa_events.track(session, "duplicate", email="jill@acme.co")
        db = scoped_session(sessionmaker(engine))
        db.add(User(email="joe@acme.co"))
        scoped = sa_events.identify(db, email="joe@acme.co")
        db.commit()
        db.remove()
    assert [c.id for c in events] == [committed, outer, scoped]
    assert not events.tracked("rolled_back") and not events.tracked("duplicate")


def test_sqlalchemy_a_session_joined_to_a_test_transaction_records_at_its_own_commit(engine):
    """The usual rolled-back-per-test fixture (docs/testing.md): the session commits a savepoint of the test's
    transaction; that commit records, the session's rollback does not."""
    with engine.connect() as connection, worker.testing.recorder() as events:
        test_transaction = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        session.add(User(email="jill@acme.co"))
        committed = sa_events.track(session, "signed_up", email="jill@acme.co")
        session.commit()
        session.add(User(email="jack@acme.co"))
        sa_events.track(session, "rolled_back", email="jack@acme.co")
        session.rollback()
        session.close()
        test_transaction.rollback()
    assert [c.id for c in events] == [committed]


def test_sqlalchemy_async_session_records_through_the_asyncio_api(tmp_path, monkeypatch):
    def blocking_send(prepared):
        raise AssertionError("an AsyncSession's commit used the blocking API")

    monkeypatch.setattr(producer, "send", blocking_send)

    async def scenario() -> str:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with AsyncSession(engine) as session:
            async with session.begin():
                session.add(User(email="jill@acme.co"))
                event_id = sa_events.track(session, "signed_up", email="jill@acme.co")
            with pytest.raises(RuntimeError):
                async with session.begin():
                    sa_events.track(session, "rolled_back", email="jill@acme.co")
                    raise RuntimeError
        await engine.dispose()
        return event_id

    with worker.testing.recorder() as events:
        event_id = asyncio.run(scenario())
    assert [(c.event, c.id) for c in events] == [("signed_up", event_id)]


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
        cursor.execute("CREATE TABLE IF NOT EXISTS testing_signups (email TEXT UNIQUE)")
    yield connection
    connection.close()


def test_django_capture_on_commit_callbacks_records_after_commit_and_a_rollback_records_nothing(django_db):
    from django.db import IntegrityError, transaction
    from django.test import TestCase

    from worker.oncommit import django as dj_events

    def signup(email: str) -> str:
        with transaction.atomic():
            event_id = dj_events.track("signed_up", email=email)
            with django_db.cursor() as cursor:
                cursor.execute("INSERT INTO testing_signups VALUES (%s)", [email])
        return event_id

    with worker.testing.recorder() as events, transaction.atomic():  # as a TestCase: one transaction, rolled back
        with TestCase.captureOnCommitCallbacks(execute=False) as callbacks:
            signup("held@acme.co")
        assert len(callbacks) == 1 and len(events) == 0  # the commit never comes: nothing recorded
        with TestCase.captureOnCommitCallbacks(execute=True):
            committed = signup("jill@acme.co")
            assert len(events) == 0
        assert [c.id for c in events] == [committed]
        with TestCase.captureOnCommitCallbacks(execute=True):
            with pytest.raises(IntegrityError):
                signup("jill@acme.co")  # taken: the block rolls back
        assert [c.id for c in events] == [committed]
        transaction.set_rollback(True)
    # Autocommit (no transaction): recorded at once.
    with worker.testing.recorder() as events:
        at_once = dj_events.segment(email="jill@acme.co", add=["vip"])
    assert [c.id for c in events] == [at_once]


# -- finding and asserting ----------------------------------------------------------------------


@pytest.fixture
def recorded():
    lists = {"vip": "cl_vip", "beta": "cl_beta", "trial": "cl_trial"}
    with worker.testing.recorder(loops_mailing_lists=lists) as events:
        worker.identify(email="jill@acme.co", user_id="u1", traits={"plan": "pro", "seats": 3})
        worker.track("signed_up", email="jill@acme.co", user_id="u1", properties={"team": "acme", "n": 1},
                     occurred_at="2026-01-02T03:04:05+00:00")
        worker.track("signed_up", email="jack@acme.co", properties={"team": "acme"})
        worker.segment(email="jill@acme.co", add=["vip", "beta"], remove=["trial"])
        worker.segment(pid="p1", add=["vip"])
        yield events


def test_finding_calls(recorded):
    def events(found: list[Call]) -> list[tuple[str, str | None]]:
        return [(c.operation, c.email) for c in found]

    assert events(recorded.tracked("signed_up")) == [("track", "jill@acme.co"), ("track", "jack@acme.co")]
    assert events(recorded.tracked()) == events(recorded.tracked("signed_up"))
    assert events(recorded.tracked("signed_up", email="jill@acme.co")) == [("track", "jill@acme.co")]
    assert recorded.tracked("signed_up", user_id="u1") == recorded.tracked(email="jill@acme.co")
    assert recorded.tracked("signed_up", properties={"team": "acme"}) == recorded.tracked("signed_up")
    assert events(recorded.tracked(properties={"n": 1})) == [("track", "jill@acme.co")]
    assert recorded.tracked(properties={"n": 2}) == [] and not recorded.tracked("logged_in")
    assert recorded.tracked(properties={"missing": None}) == []
    assert events(recorded.tracked(occurred_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))) == [
        ("track", "jill@acme.co")]
    assert events(recorded.identified(email="jill@acme.co", traits={"plan": "pro"})) == [("identify", "jill@acme.co")]
    assert recorded.identified(traits={"plan": "free"}) == [] and recorded.identified(email="jack@acme.co") == []
    assert recorded.identified(traits={}) == recorded.identified()
    assert events(recorded.segmented(add=["vip"])) == [("segment", "jill@acme.co"), ("segment", None)]
    assert events(recorded.segmented(add=["beta", "vip"], remove=["trial"])) == [("segment", "jill@acme.co")]
    assert recorded.segmented(add=["trial"]) == [] and recorded.segmented(pid="p2") == []
    assert events(recorded.segmented(add=["vip"], vendors=["loops"])) == [("segment", "jill@acme.co")]
    assert events(recorded.segmented(pid="p1", vendors=["convertloop"])) == [("segment", None)]
    with pytest.raises(TypeError, match=r"add=\['vip'\]"):
        recorded.segmented(add="vip")


def test_assert_helpers_return_the_matches_or_fail_with_what_was_recorded(recorded):
    jill = recorded.assert_tracked("signed_up", email="jill@acme.co")
    assert [c.email for c in jill] == ["jill@acme.co"]
    assert len(recorded.assert_tracked("signed_up", times=2)) == 2
    assert recorded.assert_tracked("logged_in", times=0) == []
    assert recorded.assert_identified(traits={"seats": 3})[0].user_id == "u1"
    assert len(recorded.assert_segmented(add=["vip"])) == 2

    with pytest.raises(AssertionError) as failed:
        recorded.assert_tracked("signed_up", email="jill@acme.co", properties={"team": "acme", "n": 2, "plan": "x"})
    message = str(failed.value)
    assert message.splitlines()[0] == (
        "expected a track call matching event='signed_up', email='jill@acme.co', "
        "properties ⊇ {'team': 'acme', 'n': 2, 'plan': 'x'}; 0 of the 5 recorded call(s) match")
    assert ("  2. track 'signed_up' email='jill@acme.co' user_id='u1' properties={'team': 'acme', 'n': 1} "
            "occurred_at='2026-01-02T03:04:05Z' -> convertloop, loops, conveyour") in message
    assert "       - properties['n']: 1 != expected 2\n       - properties['plan']: missing (expected 'x')" in message
    assert "  3. track 'signed_up' email='jack@acme.co'" in message
    assert "       - email: 'jack@acme.co' != expected 'jill@acme.co'" in message
    assert "  1. identify email='jill@acme.co' user_id='u1' traits=" in message
    assert "       - an identify call, not track" in message
    assert "  5. segment pid='p1' add=['vip'] remove=[] -> convertloop\n       - a segment call, not track" in message

    with pytest.raises(AssertionError, match=r"expected exactly 1 track call matching event='signed_up'; 2 of"):
        recorded.assert_tracked("signed_up", times=1)
    with pytest.raises(AssertionError, match=r"(?s)exactly 0 segment call .*  4\. segment .*= matches"):
        recorded.assert_segmented(email="jill@acme.co", times=0)
    with pytest.raises(AssertionError, match=r"(?s)email: not given \(expected 'x@acme.co'\)"):
        recorded.assert_segmented(pid="p1", email="x@acme.co")
    with pytest.raises(AssertionError, match=r"(?s)add: \['vip'\] lacks \['beta'\]"):
        recorded.assert_segmented(pid="p1", add=["beta"])
    with pytest.raises(AssertionError, match=r"^expected an identify call matching traits ⊇ \{'plan': 'free'\}; 0 of"):
        recorded.assert_identified(traits={"plan": "free"})
    with pytest.raises(AssertionError, match=r"traits\['plan'\]: 'pro' != expected 'free'"):
        recorded.assert_identified(traits={"plan": "free"})
    recorded.clear()
    with pytest.raises(AssertionError, match=r"(?s)0 of the 0 recorded call\(s\) match\nnothing was recorded$"):
        recorded.assert_identified()


# -- the pytest plugin --------------------------------------------------------------------------


def test_the_pytest_plugin_gives_the_fixture_and_imports_nothing_heavy_at_start(tmp_path):
    """In a fresh pytest run (its own project: no conftest, no ini), as an app's test suite would see it."""
    (tmp_path / "test_app_suite.py").write_text(textwrap.dedent("""
        import sys

        import pytest

        HEAVY = ("worker", "celery", "kombu", "redis", "pydantic_settings")
        AT_START = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)  # collection: the plugin is loaded


        def test_plugin_is_light(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("vendor_delivery_worker")
            assert AT_START == []


        def test_fixture_records(vdw_events):
            import worker

            event_id = worker.track("signed_up", email="jill@acme.co")
            assert [c.id for c in vdw_events.tracked("signed_up", email="jill@acme.co")] == [event_id]
            assert vdw_events[0].vendors == ["convertloop", "loops", "conveyour"]


        @pytest.mark.vdw_recorder(vendors=["loops"], loops_mailing_lists={"vip": "cl_vip"})
        def test_marker_configures_the_recorder(vdw_events):
            import worker

            worker.segment(email="jill@acme.co", add=["vip"])
            vdw_events.assert_segmented(add=["vip"], vendors=["loops"])
            assert vdw_events[0].vendors == ["loops"]


        def test_fixture_is_stopped_after_each_test():
            from worker.producer import api as producer

            assert producer.recording is None
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", *VENDOR_ENV_PREFIXES))}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_app_suite.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
