"""Sentry: final failures reported once, tagged; retries never; credentials scrubbed.

A vendor paused because it refuses the credentials is reported once per pause
(:func:`report_auth_pause`), naming the variables to fix -- never their values.

Sentry starts in worker processes when ``SENTRY_DSN`` is set (see
:mod:`worker.app`). :func:`before_send` replaces every configured credential
string anywhere in an event with ``[Filtered]``.

Example::

    >>> before_send({"message": "key sk-1"}, {}, secrets=["sk-1"])
    {'message': 'key [Filtered]'}
"""

from __future__ import annotations

import logging
from functools import partial

import sentry_sdk
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.types import Event, Hint

from .scrub import scrub_obj
from .settings import Settings

log = logging.getLogger(__name__)


def before_send(event: Event, hint: Hint, secrets: list[str]) -> Event:
    return scrub_obj(event, secrets)


def init_sentry(settings: Settings) -> bool:
    """Start Sentry if SENTRY_DSN is set; returns whether it did."""
    if settings.sentry_dsn is None:
        return False
    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        integrations=[
            CeleryIntegration(monitor_beat_tasks=False),
            # Error log lines are not events: the task failure is the one event.
            LoggingIntegration(level=logging.INFO, event_level=None),
        ],
        send_default_pii=False,
        before_send=partial(before_send, secrets=settings.secrets()),
        traces_sample_rate=0.0,
    )
    log.info("Sentry reporting is on")
    return True


def tag_failure(vendor: str, status: int | None, reason: str) -> None:
    """Tag the current task's scope so its Sentry event says which vendor failed and how."""
    sentry_sdk.set_tag("vendor", vendor)
    sentry_sdk.set_tag("status", str(status) if status is not None else "none")
    sentry_sdk.set_tag("reason", reason)


def report_unexpected(exc: BaseException, vendor: str) -> None:
    """Report an unexpected error of a delivery (it is retried, so the task's own failure never reports it)."""
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("vendor", vendor)
        scope.set_tag("reason", "unexpected")
        sentry_sdk.capture_exception(exc)


#: The ``reason`` tag of the event :func:`report_auth_pause` sends.
AUTH_FAILED = "auth_failed"


def report_auth_pause(vendor: str, status: int | None, credential_env: str) -> None:
    """One Sentry event (level error) for a vendor that just got paused for refusing the credentials; tagged
    ``vendor``, ``status`` and ``reason=auth_failed``. A no-op without SENTRY_DSN."""
    sentry_sdk.capture_message(
        f"{vendor}: the vendor refuses the credentials (answered {status}): its deliveries are paused until a probe "
        f"is accepted; fix {credential_env}",
        level="error",
        tags={"vendor": vendor, "status": str(status) if status is not None else "none", "reason": AUTH_FAILED},
    )
