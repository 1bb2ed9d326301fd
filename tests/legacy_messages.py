"""The ``worker.deliver`` message as producers wrote it before compact messages (commit fca66c4): kept to test
that messages already queued, waiting or parked at an upgrade still deliver, and to measure what compact
messages save (``tests/benchmarks/msgbytes.py``).

A copy of that commit's ``worker/envelope.py`` builder, unchanged in what it writes: every header
``app.amqp.as_task_v2`` gives a ``worker.deliver`` message (nulls and defaults included), the body base64
(``properties.body_encoding``), the embed ``{"callbacks": null, ...}``, kombu's publish properties.

Example::

    >>> ((queue, message),) = LegacyTaskMessages().build({"id": "e1", "operation": "track"}, ["loops"])
    >>> queue, json.loads(message)["properties"]["body_encoding"]
    ('loops', 'base64')
"""

from __future__ import annotations

import base64
import json
import os
import socket
from typing import Any

from worker.keys import HEADER

DELIVER_TASK = "worker.deliver"

_TASK_ID, _QUEUE, _TAG, _BODY, _ARGSREPR = "@@task_id@@", "@@queue@@", "@@tag@@", "@@body@@", "@@argsrepr@@"
_ORDER = "@@order@@"


def _template(envelope: dict[str, Any]) -> str:
    template = json.dumps(envelope).replace("%", "%%")
    for marker in (_TASK_ID, _QUEUE, _TAG, _BODY, _ARGSREPR, _ORDER):
        template = template.replace(marker, f"%({marker.strip('@')})s")
    return template


def task_headers(task_id: str, argsrepr: str, origin: str | None = None) -> dict[str, Any]:
    """The protocol-2 headers Celery 5 (``app.amqp.as_task_v2``) gives a ``worker.deliver`` message without options."""
    return {
        "lang": "py", "task": DELIVER_TASK, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
        "parent_id": None, "argsrepr": argsrepr, "kwargsrepr": "{}",
        "origin": origin or f"gen{os.getpid()}@{socket.gethostname()}",
        "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class LegacyTaskMessages:
    """Serialized ``worker.deliver`` messages in the format before compact messages."""

    def __init__(self) -> None:
        envelope: dict[str, Any] = {
            "body": _BODY,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": task_headers(_TASK_ID, _ARGSREPR),
            "properties": {
                "correlation_id": _TASK_ID,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": _QUEUE},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": _TAG,
            },
        }
        self._template = _template(envelope)
        self._ordered = _template({**envelope, "headers": {**envelope["headers"], HEADER: _ORDER}})
        self._embed = json.dumps(EMBED)

    def build(self, payload: dict[str, Any], vendors: list[str], task_id_suffix: str = "",
              event_json: str | None = None, persons: dict[str, str] | None = None) -> list[tuple[str, str]]:
        event_json = event_json or json.dumps(payload)
        event_id, operation = payload["id"], payload["operation"]
        persons = persons or {}
        out: list[tuple[str, str]] = []
        for vendor in vendors:
            body = f'[[{json.dumps(vendor)}, {event_json}], {{}}, {self._embed}]'
            task_id = f"{event_id}.{vendor}{task_id_suffix}"
            person = persons.get(vendor)
            out.append((vendor, (self._template if person is None else self._ordered) % {
                "task_id": task_id,
                "queue": vendor,
                "tag": os.urandom(16).hex(),
                "body": base64.b64encode(body.encode()).decode(),
                "argsrepr": f"('{vendor}', <{operation} {event_id}>)",
                "order": person,
            }))
        return out

    def retry(self, vendor: str, payload: dict[str, Any], task_id: str, retries: int,
              headers: dict[str, Any]) -> str:
        ((_, message),) = self.build(payload, [vendor])
        envelope = json.loads(message)
        envelope["headers"].update(headers, id=task_id, retries=retries)
        return json.dumps(envelope)


def legacy_event(payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The event as producers wrote it before compact messages (unset fields as nulls), and its JSON."""
    from worker.events import parse_event, to_json

    full = parse_event(payload).model_dump(mode="json")
    return full, to_json(full)


def queue_legacy(redis_url: str, payload: dict[str, Any], vendors: list[str], prefix: str = "vdw") -> list[str]:
    """Queue ``payload`` as a producer did before compact messages: a message per vendor in that format, each call
    in its person's order (the same MULTI), written as the publisher writes. Returns the task ids."""
    import redis

    from worker.producer.publisher import _push, ordered

    full, text = legacy_event(payload)
    messages = ordered(LegacyTaskMessages(), full, vendors, prefix, event_json=text)  # type: ignore[arg-type]
    client = redis.Redis.from_url(redis_url)
    try:
        _push(client, messages)
    finally:
        client.close()
    return [f"{full['id']}.{vendor}" for vendor in vendors]


def schedule_legacy_retry(redis_url: str, payload: dict[str, Any], vendor: str, attempts: int, first_failure: float,
                          prefix: str = "vdw") -> str:
    """A retry waiting on ``vendor``'s schedule (due now) as a worker wrote it before compact messages: the whole
    message in that format with ``retries`` and the retry header as a mapping, and the call in its person's
    order. Returns the task id."""
    import redis

    from worker.keys import HEADER, order_commands, person_id
    from worker.retries.schedule import RetrySchedule
    from worker.vendors import VENDORS

    full, text = legacy_event(payload)
    task_id = f"{full['id']}.{vendor}"
    person = person_id(VENDORS[vendor].person_key(full["identity"]) or "")
    headers = {"vdw_retry": {"attempts": attempts, "first_failure": first_failure}, HEADER: person}
    message = LegacyTaskMessages().retry(vendor, full, task_id, attempts, headers)
    client = redis.Redis.from_url(redis_url)
    try:
        pipe = client.pipeline(transaction=True)
        for command in order_commands(prefix, vendor, person, task_id, text):
            pipe.execute_command(*command)
        pipe.execute()
        RetrySchedule(client, prefix).add(vendor, message, 0)
    finally:
        client.close()
    return task_id
