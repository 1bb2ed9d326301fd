"""The vendor-agnostic delivery of one event to one vendor.

    parse -> cap -> limiter -> send -> classify -> delivered | retry | dead letter

An event a vendor can send in bulk (ConveYour identify/segment) goes through
the vendor's :class:`~worker.delivery.batching.Batcher` instead (limiter and send are
shared by the batch); its own outcome is settled here like any other.

No Celery here: :meth:`Pipeline.deliver` returns :class:`Delivered` or
:class:`RetryLater` (the task puts it on the retry schedule), raises
:class:`~worker.errors.DeadLettered` after storing a dead letter,
:class:`~worker.limits.throttle.Throttled` when the vendor's tokens are all
spoken for, or :class:`VendorDown` while the vendor's circuit breaker is open
(:class:`VendorAuthFailed` when it is paused because it refuses the credentials).
Every request's result feeds the vendor's :class:`~worker.retries.breaker.Breaker`,
and every outcome, request duration and 429 the process's metrics
(:mod:`worker.metrics`: in memory, flushed to Redis by a thread).

Example::

    >>> result = Pipeline.default().deliver("loops", payload, attempt=1)  # doctest: +SKIP
    >>> result                                                            # doctest: +SKIP
    Delivered(vendor='loops', status=200, attempt=1, elapsed=0.012)
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import httpx
import pydantic

from .. import clients, metrics, observability
from ..errors import (
    CONFIGURATION,
    MALFORMED,
    PROPERTY_CAP,
    REJECTED,
    REQUEST_ERROR,
    RETRIES_EXHAUSTED,
    VENDOR_DISABLED,
    DeadLettered,
)
from ..events import check_encodable, merge, parse_event, utc_iso
from ..limits.ratelimit import RateLimiter, limiter_for
from ..limits.throttle import Throttle
from ..retries import backoff
from ..retries.attempts import RetryState
from ..retries.breaker import Breaker
from ..retries.schedule import RetrySchedule
from ..scripts import ScriptCall
from ..settings import Settings, get_settings
from ..vendors import VENDORS, Outcome, Request, Vendor, Verdict
from ..vendors.base import AnyEvent
from . import ordering
from .batching import Batcher, Sent
from .deadletters import MAX_RAW_CHARS, DeadLetter, DeadLetterStore, error_text
from .ordering import Entry, PersonLog

log = logging.getLogger(__name__)

#: Headers every vendor request carries (credentials are added per vendor at send time).
_BASE_HEADERS = {"User-Agent": clients.USER_AGENT, "Accept": "application/json"}

#: Transport failures worth another attempt; anything else httpx raises is a request we cannot make.
RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

#: Answers that say the vendor refuses the credentials (a run of them pauses the vendor: AUTH_FAILURE_THRESHOLD).
AUTH_REFUSED = (401, 403)


@dataclass(frozen=True)
class Delivered:
    vendor: str
    status: int
    attempt: int
    elapsed: float


@dataclass(frozen=True)
class RetryLater:
    vendor: str
    status: int | None
    attempt: int
    countdown: float
    error: str
    #: What the next attempt carries: counted failures so far and when failing began.
    state: RetryState = RetryState()


@dataclass(frozen=True)
class Merged:
    """This call was delivered already, with another call's request (a person's updates merged)."""

    vendor: str


@dataclass(frozen=True)
class Parked:
    """This call waits behind the person's call that holds the turn; its message is parked under the person."""

    vendor: str
    holder: str


@dataclass(frozen=True)
class Yielded:
    """The turn ended (its request budget spent) before it reached this call: the message goes back to its queue."""

    vendor: str


#: What a delivery can come to without raising.
Outcome_ = Delivered | RetryLater | Merged | Parked | Yielded

#: Requests one turn sends at most before the person's other messages take it (a flood cannot hold a thread).
TURN_REQUESTS = 10
#: Rate-limit slots a request may miss (its thread got no CPU in time to send on them: nothing sent) before it
#: goes on the next one whenever it can.
MAX_SLOTS_MISSED = 3


class VendorDown(Exception):
    """The vendor's circuit breaker is open: the message goes back on its queue, no attempt spent."""

    def __init__(self, vendor: str) -> None:
        self.vendor = vendor
        super().__init__(f"{vendor}: circuit breaker open, waiting for the vendor to answer again")


class VendorAuthFailed(VendorDown):
    """The vendor refuses the credentials and is paused for it: the message goes back, no attempt spent."""

    def __init__(self, vendor: str, status: int | None, credential_env: str) -> None:
        super().__init__(vendor)
        self.status = status
        self.credential_env = credential_env

    def __str__(self) -> str:
        return (f"{self.vendor}: answered {self.status}: the credentials are refused; deliveries wait until a probe "
                f"is accepted (fix {self.credential_env})")


@dataclass(frozen=True)
class _Attempt:
    """One attempt at delivering a parsed event to a vendor."""

    vendor: Vendor
    event: AnyEvent
    payload: dict[str, Any]
    number: int
    task_id: str | None
    #: Unix time of the first counted failure before this attempt (None: this is the first failure, if any).
    first_failure: float | None = None

    def dead_letter(self, reason: str, error: str, **extra: Any) -> DeadLetter:
        first = utc_iso(self.first_failure) if self.first_failure is not None else None
        return DeadLetter(vendor=self.vendor.name, operation=self.event.operation, reason=reason,
                          attempts=self.number, event_id=self.event.id, error=error, event=self.payload,
                          task_id=self.task_id, first_failed_at=first, **extra)


class RetryableError(Exception):
    """What a delivery task shows while it waits to retry (Flower: RETRY)."""


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        http: clients.VendorHTTP,
        store: DeadLetterStore,
        limiters: dict[str, RateLimiter],
        throttle: Throttle,
        vendors: dict[str, Vendor] = VENDORS,
        breaker: Breaker | None = None,
        schedule: RetrySchedule | None = None,
        recorder: metrics.Recorder | None = None,
    ) -> None:
        self.settings = settings
        self.http = http
        self._timeout = clients.request_timeout(settings)
        self.store = store
        self.limiters = limiters
        self.throttle = throttle
        self.vendors = vendors
        self.breaker = breaker
        self.schedule = schedule
        self.metrics = recorder if recorder is not None else metrics.RECORDER
        self._batchers: dict[str, Batcher[AnyEvent]] = {}
        self._batchers_lock = threading.Lock()
        self._orders: dict[str, PersonLog] = {}

    _default: Pipeline | None = None
    _default_lock = threading.Lock()

    @classmethod
    def default(cls) -> Pipeline:
        """The process's pipeline, built from the environment on first use."""
        with cls._default_lock:
            if cls._default is None:
                s = get_settings()
                r = clients.redis_client()
                http = clients.http_client()

                def warm(vendor: Vendor) -> Callable[[], bool] | None:
                    base = vendor.base_url(s)
                    return functools.partial(http.warm, base) if base else None

                limiters = {
                    name: limiter_for(r, f"{s.key_prefix}:ratelimit:{name}", v.rate_limit(s), warm=warm(v))
                    for name, v in VENDORS.items()
                }
                breaker = Breaker(r, s.key_prefix, s.breaker_threshold, s.breaker_probe_max,
                                  auth_threshold=s.auth_failure_threshold, auth_interval=s.auth_probe_interval)
                cls._default = cls(s, http, DeadLetterStore.default(), limiters, Throttle(),
                                   breaker=breaker, schedule=RetrySchedule(r, s.key_prefix))
            return cls._default

    @classmethod
    def reset_default(cls) -> None:
        with cls._default_lock:
            cls._default = None

    # -- the flow -------------------------------------------------------------

    def deliver(self, vendor_name: Any, payload: Any, attempt: int = 1, task_id: str | None = None,
                first_failure: float | None = None, probe: bool = False, person: str | None = None,
                park: Callable[[], str] | None = None, tag: str | None = None,
                defer: Callable[[Callable[[str], ScriptCall]], None] | None = None,
                claimed: ordering.Turn | None = None) -> Outcome_:
        """Deliver ``payload`` to ``vendor_name``: attempt number ``attempt`` (counted failures so far + 1).

        ``probe``: this delivery tests an open breaker, so it goes even though the breaker is open (alone,
        never in a batch). ``person`` (the message's :data:`~worker.delivery.ordering.HEADER`): the call is kept in that
        person's order (:meth:`_turn`); ``park`` makes the message that runs this task again if it must wait,
        ``tag`` is its delivery tag; ``defer(end)``, when given, has the message's acknowledgement make the script
        call ``end(tag)`` instead: the turn's end and the ack in one round trip; ``claimed``: the claim of the person's
        turn the message's take made already (worker/broker/transport.py), if it did.
        """
        try:
            result = self._deliver(vendor_name, payload, attempt, task_id, first_failure, probe, person, park, tag,
                                   defer, claimed)
        except BaseException:
            if claimed is not None and claimed.state == ordering.CLAIMED and person and task_id:
                # The take claimed the person's turn for this delivery, which ends here without it (dead letter,
                # breaker open, throttled, anything unexpected): give it up at once, not at the lease's end.
                try:
                    self.order(vendor_name).finish(person, task_id)
                except Exception:
                    log.warning("could not give up the turn of %s", task_id, exc_info=True)
            raise
        # This call's dead letter is raised only here, once its turn's end is recorded (or deferred to the ack):
        # raised inside, the turn was given up above without recording the dead call, and the person's next
        # message sent it again, merged with its own call.
        if isinstance(result, DeadLettered):
            raise result
        return result

    def _deliver(self, vendor_name: Any, payload: Any, attempt: int, task_id: str | None,
                 first_failure: float | None, probe: bool, person: str | None, park: Callable[[], str] | None,
                 tag: str | None, defer: Callable[[Callable[[str], ScriptCall]], None] | None,
                 claimed: ordering.Turn | None) -> Outcome_ | DeadLettered:
        vendor = self.vendors.get(vendor_name) if isinstance(vendor_name, str) else None
        if vendor is None:
            self._dead(
                DeadLetter(vendor=str(vendor_name)[:64], operation=None, reason=MALFORMED, attempts=attempt,
                           event_id=None, error=f"unknown vendor {vendor_name!r}", raw=_raw(payload), task_id=task_id)
            )
        try:
            event = parse_event(payload)
        except pydantic.ValidationError as exc:
            self._dead(
                DeadLetter(vendor=vendor.name, operation=_get(payload, "operation"), reason=MALFORMED,
                           attempts=attempt, event_id=_get(payload, "id"), error=_summary(exc),
                           raw=_raw(payload), task_id=task_id)
            )
        try:  # the producer's limits (32 KiB, no NaN) hold for messages that did not come through it, too
            check_encodable(payload)
        except ValueError as exc:
            self._dead(DeadLetter(vendor=vendor.name, operation=event.operation, reason=MALFORMED, attempts=attempt,
                                  event_id=event.id, error=str(exc), raw=_raw(payload), task_id=task_id))
        this = _Attempt(vendor, event, payload, attempt, task_id, first_failure)
        if person is not None and task_id is not None and park is not None:
            if not probe and self.breaker is not None and self.breaker.is_open(vendor.name):
                raise VendorDown(vendor.name)
            return self._turn(this, person, park, tag, probe, defer, claimed)

        refused = self._cannot_carry(this)
        if refused is not None:
            self._dead(refused)
        if not probe and self.breaker is not None and self.breaker.is_open(vendor.name):
            raise VendorDown(vendor.name)
        return self._settle(this, *self._send_one(vendor, event, probe))

    def unexpected(self, vendor_name: Any, payload: Any, attempt: int, task_id: str | None,
                   first_failure: float | None, error: BaseException) -> RetryLater:
        """An attempt raised something unexpected (a bug, Redis refusing a write): retry it like a failed request,
        counted against RETRY_MAX_ATTEMPTS and the window, then dead-letter it (raised). Raises the parse error
        when the event cannot be read at all (the caller leaves the message to come back)."""
        vendor = self.vendors[vendor_name]
        this = _Attempt(vendor, parse_event(payload), payload, attempt, task_id, first_failure)
        request = Request("-", "-", None)
        result = self._retry(this, request, None, None, f"unexpected {type(error).__name__}: {error}")
        if isinstance(result, DeadLetter):
            self._dead(result.model_copy(update={"request": None}))
        return result

    # -- per-person order -------------------------------------------------------

    def order(self, vendor: str) -> PersonLog:
        """The vendor's per-person order in Redis (worker/delivery/ordering.py)."""
        log_ = self._orders.get(vendor)
        if log_ is None:
            log_ = self._orders[vendor] = PersonLog(self.store.client, self.settings.key_prefix, vendor)
        return log_

    def _turn(self, this: _Attempt, person: str, park: Callable[[], str], tag: str | None,
              probe: bool, defer: Callable[[Callable[[str], ScriptCall]], None] | None = None,
              claimed: ordering.Turn | None = None) -> Outcome_ | DeadLettered:
        """Take the person's turn and deliver their pending calls from the oldest, merging runs of updates;
        or find this call delivered already (Merged), or park it behind the task that holds the turn.

        The turn goes on for at most :data:`TURN_REQUESTS` requests (and a quarter of the visibility timeout),
        then it is given up and the person's other messages take it. A retry keeps it (the caller puts this
        message on the retry schedule and extends the turn until it is due). Once this call is settled, with
        ``defer``, the turn ends with this message's acknowledgement (one round trip for both); the person's
        calls that came meanwhile are taken by their own messages.
        """
        vendor, task_id = this.vendor, this.task_id
        assert task_id is not None, "an ordered delivery has a task id"
        order = self.order(vendor.name)
        lease = self.settings.visibility_timeout
        turn = claimed if claimed is not None else order.claim(person, task_id, lease)
        if turn.state == ordering.BUSY:
            turn = order.park(person, task_id, lease, park(), tag)
        if turn.state == ordering.PARKED:
            log.debug("%s: %s waits behind %s", vendor.name, task_id, turn.holder)
            return Parked(vendor.name, turn.holder)
        if turn.state == ordering.DONE:
            return self._already(vendor.name, turn.outcome)
        own: Delivered | DeadLettered | None = None
        number, first = this.number, this.first_failure
        split = 0  # calls to send one at a time: a merged request the vendor rejected, to find which call it was
        started, requests = time.monotonic(), 0
        try:
            while turn.state == ordering.CLAIMED and turn.entries:
                done: list[str] = []
                dead: dict[str, str] = {}
                run = self._run(vendor, turn.entries, number, first, single=split > 0 or probe, own=this)
                if isinstance(run, DeadLetter):  # the oldest call cannot be sent at all: its dead letter
                    stored = self._store_dead(run)
                    assert stored.task_id is not None
                    done, dead = [stored.task_id], {stored.task_id: _outcome(stored)}
                    own = _dead_error(stored, self.store.secrets) if stored.task_id == task_id else own
                else:
                    head = run[0]
                    event = head.event if len(run) == 1 else merge(
                        [a.event for a in run], tuple(a.task_id or "" for a in run))  # type: ignore[misc]
                    result = self._classify(replace(head, event=event), *self._send_one(vendor, event, probe))
                    requests += 1
                    ids = [a.task_id or "" for a in run]
                    if isinstance(result, RetryLater):
                        return result  # the turn stays this task's: its message goes on the retry schedule
                    if isinstance(result, DeadLetter) and len(run) > 1 and result.reason == REJECTED:
                        log.warning("%s refused %s merged calls (%s); sending them one at a time",
                                    vendor.name, len(run), result.error)
                        split = len(run)
                    elif isinstance(result, DeadLetter):
                        for a in run:
                            stored = self._store_dead(result.model_copy(update={
                                "id": uuid.uuid4().hex, "event": a.payload, "event_id": a.event.id,
                                "operation": a.event.operation, "task_id": a.task_id}))
                            dead[a.task_id or ""] = _outcome(stored)
                            own = _dead_error(stored, self.store.secrets) if a.task_id == task_id else own
                        done, number, first, split = ids, 1, None, max(0, split - len(run))
                    else:
                        if len(run) > 1:
                            self.metrics.record(vendor.name, metrics.MERGED, count=len(run) - 1)
                        own = result if task_id in ids else own
                        done, number, first, split = ids, 1, None, max(0, split - len(run))
                if own is not None and defer is not None:
                    # The turn ends with this message's acknowledgement, recording ``done``; a dead letter is
                    # returned, not raised (raised, the handler below would give the turn up unrecorded).
                    defer(functools.partial(_end, order, person, task_id, done, dead))
                    return own
                go_on = (not probe and requests < TURN_REQUESTS and time.monotonic() - started < lease / 4)
                turn = order.finish(person, task_id, done, dead, go_on=go_on, lease=lease)
        except BaseException:
            # Throttled, or anything unexpected: the turn is given up (nothing is lost: the calls stay pending
            # in the person's order, and their messages come back); what was done so far is recorded already.
            try:
                order.finish(person, task_id)
            except Exception:
                log.warning("%s: could not give up the turn of %s", vendor.name, task_id, exc_info=True)
            raise
        if turn.state == ordering.CLAIMED:  # a claim that found nothing pending
            order.finish(person, task_id)
        return own if own is not None else Yielded(vendor.name)

    def _already(self, vendor: str, outcome: str) -> Merged:
        """This call was settled with another's request: delivered, or dead-lettered (raised again)."""
        if outcome:
            reason, status, entry = outcome.split("|", 2)
            raise DeadLettered(vendor, int(status) if status else None, reason, entry)
        return Merged(vendor)

    def _run(self, vendor: Vendor, entries: Sequence[Entry], number: int, first: float | None,
             single: bool, own: _Attempt | None = None) -> list[_Attempt] | DeadLetter:
        """The oldest pending call, and the updates after it that go in the same request; or the oldest call's
        dead letter (not stored yet) when it cannot be sent. ``own``: this task's call, parsed from its message
        already (its entry is the same event: the producer writes both in one step)."""
        head = self._entry(vendor, entries[0], number, first, own)
        if isinstance(head, DeadLetter):
            return head
        refused = self._cannot_carry(head)
        if refused is not None:
            return refused
        run = [head]
        if single or not vendor.mergeable(head.event):
            return run
        for entry in entries[1:]:
            nxt = self._entry(vendor, entry, number, first, own)
            if isinstance(nxt, DeadLetter) or not vendor.mergeable(nxt.event) or self._cannot_carry(nxt):
                break
            run.append(nxt)
        return run

    @staticmethod
    def _entry(vendor: Vendor, entry: Entry, number: int, first: float | None,
               own: _Attempt | None = None) -> _Attempt | DeadLetter:
        """A pending call as an attempt; a call that does not parse as its (malformed) dead letter."""
        if own is not None and entry.task_id == own.task_id:
            return _Attempt(vendor, own.event, own.payload, number, entry.task_id, first)
        try:
            payload = json.loads(entry.event_json)
            event = parse_event(payload)
        except ValueError as exc:  # json's and pydantic's errors
            return DeadLetter(vendor=vendor.name, operation=None, reason=MALFORMED, attempts=number, event_id=None,
                              error=f"not an event: {type(exc).__name__}", raw=entry.event_json[:MAX_RAW_CHARS],
                              task_id=entry.task_id)
        return _Attempt(vendor, event, payload, number, entry.task_id, first)

    def _cannot_carry(self, this: _Attempt) -> DeadLetter | None:
        """Why this worker cannot send the event (its dead letter, not stored yet), or None."""
        vendor, event = this.vendor, this.event
        if not vendor.enabled(self.settings):
            return this.dead_letter(VENDOR_DISABLED, f"{vendor.name} is not configured on this worker "
                                                     f"(set {vendor.credential_env})")
        cap = self.settings.event_property_cap
        if event.operation == "track" and len(event.properties) > cap:
            return this.dead_letter(PROPERTY_CAP, f"{len(event.properties)} properties; EVENT_PROPERTY_CAP is {cap}")
        refusal = vendor.refusal(event, self.settings)
        if refusal is not None:  # the producer's settings allowed it, this worker's do not (e.g. a rolling deploy)
            return this.dead_letter(CONFIGURATION, f"{refusal} on this worker; replay it once the workers' "
                                                   "settings can carry it")
        return None

    def _send_one(self, vendor: Vendor, event: AnyEvent, probe: bool) -> tuple[Request, Sent]:
        """Build and send one event's request (through the vendor's batcher when it takes it)."""
        request = vendor.build(event, self.settings)
        batcher = self._batcher(vendor) if vendor.batchable(event) and not probe else None
        if batcher is not None:
            return request, batcher.submit(event)
        limiter = self.limiters[vendor.name]
        for _ in range(MAX_SLOTS_MISSED):
            send_by = self.throttle.wait(vendor.name, limiter)
            try:
                (sent,) = self._exchange(vendor, [event], request, send_by)
                return request, sent
            except clients.SlotMissed as exc:
                log.debug("%s event=%s: %s; taking another slot", vendor.name, event.id, exc)
        self.throttle.wait(vendor.name, limiter)  # the last: sent whatever the time
        (sent,) = self._exchange(vendor, [event], request)
        return request, sent

    # -- steps ----------------------------------------------------------------

    def _batcher(self, vendor: Vendor) -> Batcher[AnyEvent] | None:
        """The vendor's batcher in this process, or None when it sends each event alone."""
        size = vendor.batch_size(self.settings)
        if size <= 1:
            return None
        with self._batchers_lock:
            batcher = self._batchers.get(vendor.name)
            if batcher is None:
                batcher = self._batchers[vendor.name] = Batcher(
                    vendor.name, self.limiters[vendor.name], functools.partial(self._exchange, vendor),
                    size, vendor.batch_max_wait(self.settings), horizon=self.throttle.horizon,
                    deadline=self.settings.visibility_timeout / 2)
            return batcher

    def _exchange(self, vendor: Vendor, events: list[AnyEvent], request: Request | None = None,
                  send_by: float | None = None) -> list[Sent]:
        """One request carrying ``events`` (a token is already held): one :class:`Sent` per event. ``request``:
        the one event's request, built already; ``send_by``: its token's deadline (past it: nothing sent,
        :class:`~worker.clients.SlotMissed` raised)."""
        n = len(events)
        if request is None or n != 1:
            request = vendor.build_batch(events, self.settings)
        started = time.monotonic()
        try:
            response = self._send(vendor, request, send_by)
        except RETRYABLE_ERRORS as exc:
            self.metrics.request(vendor.name, time.monotonic() - started, None)
            self._health(vendor, None)
            return [Sent(Outcome(Verdict.RETRY, None), error=f"{type(exc).__name__}: {exc}", batch=n, index=i)
                    for i in range(n)]
        except httpx.HTTPError as exc:
            return [Sent(Outcome(Verdict.REJECTED, None), error=f"{type(exc).__name__}: {exc}", batch=n, index=i)
                    for i in range(n)]
        elapsed = round(time.monotonic() - started, 4)
        self.metrics.request(vendor.name, elapsed, response.status)
        outcomes = vendor.classify_batch(response.status, response.headers, response.text, request, n)
        retry_after = max((o.retry_after or 0.0 for o in outcomes if o.status == 429), default=0.0)
        if retry_after:
            self.limiters[vendor.name].penalize(retry_after)
        self.limiters[vendor.name].observe(response.status, response.headers)
        # A 429 says nothing about the vendor's health: the limiter's business.
        paused = response.status != 429 and self._health(vendor, response.status)
        if n > 1:
            log.info("sent %s events to %s in one request: status=%s in %.0fms",
                     n, vendor.name, response.status, elapsed * 1000)
        return [Sent(o, response.text, None, n, i, elapsed, paused) for i, o in enumerate(outcomes)]

    def _settle(self, this: _Attempt, request: Request, sent: Sent) -> Delivered | RetryLater:
        """Delivered, retry or dead letter (raised), from what became of this event's request."""
        result = self._classify(this, request, sent)
        if isinstance(result, DeadLetter):
            self._dead(result)
        return result

    def _classify(self, this: _Attempt, request: Request, sent: Sent) -> Delivered | RetryLater | DeadLetter:
        """Delivered, retry, or the dead letter to store, from what became of this event's request."""
        vendor, outcome = this.vendor, sent.outcome
        if sent.paused:
            raise VendorAuthFailed(vendor.name, outcome.status, vendor.credential_env)
        if sent.error is not None:
            if outcome.verdict is Verdict.RETRY:
                return self._retry(this, request, None, None, sent.error)
            return this.dead_letter(REQUEST_ERROR, sent.error, request=_request_dict(request))
        bulk = f" (item {sent.index} of a bulk request of {sent.batch})" if sent.batch > 1 else ""
        if outcome.verdict is Verdict.DELIVERED:
            assert outcome.status is not None, "a delivered verdict comes from a vendor's answer"
            # DEBUG: Celery's own "succeeded" line already says vendor, status, attempt and time.
            log.debug("delivered %s %s event=%s status=%s attempt=%s in %.0fms%s",
                     vendor.name, this.event.operation, this.event.id, outcome.status, this.number,
                     sent.elapsed * 1000, bulk)
            self.metrics.record(vendor.name, metrics.DELIVERED)
            return Delivered(vendor.name, outcome.status, this.number, sent.elapsed)
        error = f"{vendor.name} answered {outcome.status}{bulk}" + (f": {outcome.message}" if outcome.message else "")
        if outcome.verdict is Verdict.REJECTED:
            return this.dead_letter(REJECTED, error, status=outcome.status, response_body=sent.body,
                                    request=_request_dict(request))
        return self._retry(this, request, outcome.status, outcome.retry_after, error, sent.body)

    def _health(self, vendor: Vendor, status: int | None) -> bool:
        """Tell the vendor's breaker how a request went (``status`` None: no answer); when this closes it, release
        what waited. True when the answer is a 401/403 and the vendor is paused for refused credentials: then the
        delivery goes back to its queue instead of becoming a dead letter."""
        if self.breaker is None:
            return False
        if status in AUTH_REFUSED and self.breaker.auth_enabled:
            return self._auth_refused(vendor, status)
        if self.breaker.record(vendor.name, ok=status is not None and not _failing(status)) \
                and self.schedule is not None:
            released = self.schedule.release(vendor.name)
            log.warning("%s: %s waiting retries released to the queue", vendor.name, released)
        return False

    def _auth_refused(self, vendor: Vendor, status: int) -> bool:
        """A 401/403: counted by the breaker; the run's AUTH_FAILURE_THRESHOLD-th pauses the vendor (reported
        once, by the one worker whose answer did it). True while the vendor is paused."""
        assert self.breaker is not None
        refusal = self.breaker.record_auth_failure(vendor.name)
        if refusal.paused_now:
            log.error("%s: answered %s to %s requests in a row: the vendor refuses the credentials. Its deliveries "
                      "are paused (they wait in its queue, no attempt spent): fix %s; a probe every %.0fs resumes "
                      "them once the vendor accepts a request", vendor.name, status, refusal.in_a_row,
                      vendor.credential_env, self.breaker.auth_interval)
            observability.report_auth_pause(vendor.name, status, vendor.credential_env)
        return refusal.paused

    def _send(self, vendor: Vendor, request: Request, send_by: float | None = None) -> clients.Reply:
        url = vendor.base_url(self.settings).rstrip("/") + request.path
        headers = {**_BASE_HEADERS, **request.headers, **vendor.auth_headers(self.settings)}
        return self.http.exchange(request.method, url, headers, request.json, self._timeout, send_by=send_by)

    def _retry(self, this: _Attempt, request: Request, status: int | None, retry_after: float | None,
               error: str, body: str | None = None) -> RetryLater | DeadLetter:
        """Schedule the next attempt, or dead-letter when the window (or RETRY_MAX_ATTEMPTS) is used up.

        A 429 counts for nothing: not an attempt, and it never ends the window; the delivery waits out the
        vendor's Retry-After (or the backoff of its current attempt) and tries again.
        """
        s = self.settings
        wait = backoff.countdown(this.number, retry_after, s.retry_backoff_base, s.retry_backoff_max)
        if status == 429:
            log.info("rate limited by %s event=%s: again in %.2fs (no attempt counted)",
                     this.vendor.name, this.event.id, wait)
            self.metrics.record(this.vendor.name, metrics.RETRIED)
            return RetryLater(this.vendor.name, status, this.number, round(wait, 3), error,
                              RetryState(this.number - 1, this.first_failure))
        now = time.time()
        first = this.first_failure if this.first_failure is not None else now
        window_left = first + s.retry_window - now
        out_of_attempts = 0 < s.retry_max_attempts <= this.number
        if out_of_attempts or window_left <= 0:
            why = (f"; {this.number} attempts (RETRY_MAX_ATTEMPTS)" if out_of_attempts
                   else f"; retried for {now - first:.0f}s (RETRY_WINDOW {s.retry_window:.0f}s)")
            return replace(this, first_failure=first).dead_letter(
                RETRIES_EXHAUSTED, error + why, status=status, response_body=body, request=_request_dict(request))
        wait = min(wait, window_left)  # the last attempt comes as the window ends, not after it
        log.warning("retrying %s event=%s status=%s attempt=%s in %.2fs (window left %.0fs): %s",
                    this.vendor.name, this.event.id, status, this.number, wait, window_left, error)
        self.metrics.record(this.vendor.name, metrics.RETRIED)
        return RetryLater(this.vendor.name, status, this.number, round(wait, 3), error, RetryState(this.number, first))

    def _dead(self, entry: DeadLetter) -> NoReturn:
        raise _dead_error(self._store_dead(entry), self.store.secrets)

    def _store_dead(self, entry: DeadLetter) -> DeadLetter:
        stored = self.store.add(entry)
        log.error("dead-lettered %s %s event=%s reason=%s status=%s attempts=%s id=%s: %s",
                  stored.vendor, stored.operation, stored.event_id, stored.reason, stored.status,
                  stored.attempts, stored.id, stored.error)
        observability.tag_failure(stored.vendor, stored.status, stored.reason)
        self.metrics.record(stored.vendor, metrics.DEAD_LETTERED, stored.reason)
        return stored


def _end(order: PersonLog, person: str, task_id: str, done: list[str], dead: dict[str, str],
         ack: str) -> ScriptCall:
    """The turn's end, recorded with the acknowledgement of delivery tag ``ack``: the script call to make then."""
    return order.finish_call(person, task_id, done, dead, ack=ack)


def _outcome(stored: DeadLetter) -> str:
    """How a dead-lettered call ended, for its own message to report when a worker takes it."""
    return f"{stored.reason}|{stored.status if stored.status is not None else ''}|{stored.id}"


def _dead_error(stored: DeadLetter, secrets: Sequence[str] = ()) -> DeadLettered:
    """The exception a dead-lettered delivery's task ends with; Flower shows why (the vendor's own words)."""
    return DeadLettered(stored.vendor, stored.status, stored.reason, stored.id, error_text(stored, secrets))


def _failing(status: int) -> bool:
    """A status that says the vendor is failing (for the breaker): 408 and every 5xx."""
    return status == 408 or status >= 500


def _request_dict(request: Request) -> dict[str, Any]:
    return {"method": request.method, "path": request.path, "json": request.json, "headers": dict(request.headers)}


def _get(payload: Any, key: str) -> str | None:
    value = payload.get(key) if isinstance(payload, dict) else None
    return value if isinstance(value, str) else None


def _raw(payload: Any) -> str:
    try:
        return json.dumps(payload, default=repr)
    except (TypeError, ValueError):
        return repr(payload)


def _summary(exc: pydantic.ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in exc.errors()[:5])
