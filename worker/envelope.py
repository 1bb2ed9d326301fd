"""The ``worker.deliver`` message as it lies in Redis: a Celery protocol-2 task message, built without Celery.

The producer queues these messages, and a worker writes one again when it puts a delivery on the retry
schedule or parks it behind its person's turn. Building them takes no Celery app (a web process that
calls ``worker.track`` never imports Celery): the headers are the ones ``app.amqp.as_task_v2`` makes for
this task, which a unit test pins against Celery's own. Each message only fills in its task id, queue,
delivery tag and body (and, for a call kept in its person's order, the person: :mod:`worker.keys`).

Example::

    >>> ((queue, message),) = TaskMessages().build({"id": "e1", "operation": "track"}, ["loops"])
    >>> queue, json.loads(message)["headers"]["task"], json.loads(message)["headers"]["id"]
    ('loops', 'worker.deliver', 'e1.loops')
"""

from __future__ import annotations

import base64
import json
import os
import socket
from typing import Any

from .keys import HEADER

#: The task's name: what a worker runs for each message.
DELIVER_TASK = "worker.deliver"

#: One queued message: (queue, serialized message); ``("", command, ...)`` is a Redis command sent with them.
Message = tuple[str, ...]

# Markers in the message template, replaced per message.
_TASK_ID, _QUEUE, _TAG, _BODY, _ARGSREPR = "@@task_id@@", "@@queue@@", "@@tag@@", "@@body@@", "@@argsrepr@@"
_ORDER = "@@order@@"


def _template(envelope: dict[str, Any]) -> str:
    """The envelope's JSON with its markers as %-format fields."""
    template = json.dumps(envelope).replace("%", "%%")
    for marker in (_TASK_ID, _QUEUE, _TAG, _BODY, _ARGSREPR, _ORDER):
        template = template.replace(marker, f"%({marker.strip('@')})s")
    return template


def task_headers(task_id: str, argsrepr: str, origin: str | None = None) -> dict[str, Any]:
    """The protocol-2 headers Celery 5 (``app.amqp.as_task_v2``) gives a ``worker.deliver`` message without
    options: ``origin`` is the sender's ``gen<pid>@<host>`` as Celery names an anonymous sender."""
    return {
        "lang": "py", "task": DELIVER_TASK, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
        "parent_id": None, "argsrepr": argsrepr, "kwargsrepr": "{}",
        "origin": origin or f"gen{os.getpid()}@{socket.gethostname()}",
        "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }


#: The protocol-2 body's third element (no callbacks, errbacks, chain or chord).
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class TaskMessages:
    """Serialized ``worker.deliver`` messages, as Celery and kombu's Redis transport would write them."""

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
              event_json: str | None = None, persons: dict[str, str] | None = None) -> list[Message]:
        """One (queue, message) per vendor; the task arguments are ``(vendor, payload)``. ``persons``: vendor ->
        person id, for the vendors whose message is kept in its person's order (the header says whose)."""
        event_json = event_json or json.dumps(payload)
        event_id, operation = payload["id"], payload["operation"]
        persons = persons or {}
        out: list[Message] = []
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
        """The message that runs ``task_id`` again: same task id, ``retries`` as Celery counts them, a new
        delivery tag, and ``headers`` added (what the next attempt must know)."""
        ((_, message),) = self.build(payload, [vendor])
        envelope = json.loads(message)
        envelope["headers"].update(headers, id=task_id, retries=retries)
        return json.dumps(envelope)
