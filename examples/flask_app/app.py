"""A Flask app that tells the marketing vendors about signups and segment changes.

``POST /signup`` creates a user and their team in one transaction and reports
``identify`` + ``track("signed_up")`` through :mod:`worker.oncommit.sqlalchemy`:
the calls are validated at once and published only when the transaction commits
(a taken email or team name rolls it back, and nothing is sent).
``POST /segments`` calls :func:`worker.segment` directly (blocking, bounded by
``PUBLISH_TIMEOUT``). Run it against a private stack (from the repository root)::

    make example-flask
    curl -s localhost:8000/signup -H 'content-type: application/json' \\
         -d '{"email": "jill@acme.co", "name": "Jill", "team": "acme"}'
"""

from __future__ import annotations

import os
import uuid

from flask import Flask, jsonify, request
from sqlalchemy import ForeignKey, create_engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, scoped_session, sessionmaker

import worker
from worker.oncommit import sqlalchemy as events


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[str] = mapped_column(primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(unique=True)


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(unique=True)
    name: Mapped[str]
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    team: Mapped[Team] = relationship()


def create_app() -> Flask:
    worker.check_configuration()  # no vendor enabled: refuse to start (ALLOW_NO_VENDORS=true to allow it)
    engine = create_engine(os.environ.get("DATABASE_URL", "sqlite:///flask_example.db"))
    Base.metadata.create_all(engine)
    db = scoped_session(sessionmaker(engine))
    app = Flask(__name__)

    @app.teardown_appcontext
    def end_session(exc: BaseException | None) -> None:
        db.remove()  # closes the session: calls of a transaction that did not commit are dropped

    @app.errorhandler(worker.InvalidEvent)
    def invalid_event(exc: worker.InvalidEvent):
        return jsonify(error=str(exc)), 400

    @app.errorhandler(worker.EnqueueError)
    def not_enqueued(exc: worker.EnqueueError):
        return jsonify(error=str(exc)), 503

    @app.get("/health")
    def health():
        return jsonify(ok=True)

    @app.post("/signup")
    def signup():
        data = request.get_json(force=True)
        if not all(isinstance(data.get(k), str) and data[k].strip() for k in ("name", "team")):
            return jsonify(error="name and team are required"), 400
        user = User(id=new_id(), email=data.get("email"), name=data.get("name"), team=Team(name=data.get("team")))
        db.add(user)
        events.identify(db, email=user.email, user_id=user.id, traits={"name": user.name, "team": user.team.name})
        event_id = events.track(db, "signed_up", email=user.email, user_id=user.id,
                                properties={"team": user.team.name})
        try:
            db.commit()  # the two calls are published now
        except IntegrityError:
            db.rollback()  # ... and dropped here
            return jsonify(error="that email or team name is taken"), 409
        return jsonify(user_id=user.id, event=event_id), 201

    @app.post("/segments")
    def segments():
        data = request.get_json(force=True)
        user = db.scalar(select(User).where(User.email == data.get("email")))
        if user is None:
            return jsonify(error="no such user"), 404
        event_id = worker.segment(email=user.email, user_id=user.id, add=data.get("add", []),
                                  remove=data.get("remove", []))
        return jsonify(event=event_id)

    return app


app = create_app()
