"""A FastAPI app that tells the marketing vendors about signups and segment changes, never blocking its loop.

``POST /signup`` creates a user and their team with an ``AsyncSession`` and
reports ``identify`` + ``track("signed_up")`` through
:mod:`worker.oncommit.sqlalchemy`: validated at once, published (through
:mod:`worker.aio`) when the transaction commits, dropped when it rolls back (a
taken email or team name). ``POST /segments`` awaits :func:`worker.aio.segment`.
Run it against a private stack (from the repository root)::

    make example-fastapi
    curl -s localhost:8000/signup -H 'content-type: application/json' \\
         -d '{"email": "jill@acme.co", "name": "Jill", "team": "acme"}'
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import ForeignKey, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

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


engine = create_async_engine(os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///fastapi_example.db"))
Session = async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    worker.check_configuration()  # no vendor enabled: refuse to start (ALLOW_NO_VENDORS=true to allow it)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


async def db() -> AsyncIterator[AsyncSession]:
    async with Session() as session:
        yield session


class SignupIn(BaseModel):
    email: str
    name: str
    team: str


class SegmentsIn(BaseModel):
    email: str
    add: list[str] = []
    remove: list[str] = []


@app.exception_handler(worker.InvalidEvent)
async def invalid_event(request: Request, exc: worker.InvalidEvent) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


@app.exception_handler(worker.EnqueueError)
async def not_enqueued(request: Request, exc: worker.EnqueueError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=503)


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


@app.post("/signup", status_code=201)
async def signup(body: SignupIn, session: Annotated[AsyncSession, Depends(db)]) -> dict:
    user = User(id=new_id(), email=body.email, name=body.name, team=Team(name=body.team))
    try:
        async with session.begin():
            session.add(user)
            events.identify(session, email=user.email, user_id=user.id, traits={"name": user.name, "team": body.team})
            event_id = events.track(session, "signed_up", email=user.email, user_id=user.id,
                                    properties={"team": body.team})
        # committed: the two calls were published (awaited, without blocking the loop)
    except IntegrityError:
        raise HTTPException(409, "that email or team name is taken") from None  # rolled back: nothing sent
    return {"user_id": user.id, "event": event_id}


@app.post("/segments")
async def segments(body: SegmentsIn, session: Annotated[AsyncSession, Depends(db)]) -> dict:
    user = await session.scalar(select(User).where(User.email == body.email))
    if user is None:
        raise HTTPException(404, "no such user")
    event_id = await worker.aio.segment(email=user.email, user_id=user.id, add=body.add, remove=body.remove)
    return {"event": event_id}
