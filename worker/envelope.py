"""The ``worker.deliver`` message as it lies in Redis: a compact Celery protocol-2 task message, built without Celery.

The producer queues these messages, and a worker writes one again when it puts a delivery on the retry
schedule or parks it behind its person's turn. Building them takes no Celery app (a web process that
calls ``worker.track`` never imports Celery).

A message carries only what a Celery 5 worker reads without a default, and what this product reads:

- headers ``task``, ``id`` (Celery reads both with ``[]``) and ``argsrepr`` (the args summary Flower shows:
  ``('loops', <track>)``; the event id is in the task id); ``retries`` once it is not 0; this product's
  ``vdw_order`` (:mod:`worker.keys`) and ``vdw_retry`` (:mod:`worker.retries.attempts`) when they apply.
  Every other header ``app.amqp.as_task_v2`` writes is null or the very default the worker reads with
  ``.get`` (``celery/worker/request.py``, ``celery/app/trace.py``, ``celery/app/task.py``'s ``Context``):
  ``root_id`` defaults to the task's own id, ``retries`` to 0, ``timelimit`` to none, ``ignore_result`` to
  the task's own (``task_ignore_result``), ``lang``/``origin`` are read by nothing;
- the body as JSON text, ``[[vendor, event], {}, {}]``: no ``properties.body_encoding``, so kombu's Redis
  transport takes it as is (``kombu/transport/virtual/base.py`` ``decode_body``), where base64 added a
  third; the embed ``{}`` is Celery's no callbacks, errbacks, chain or chord;
- ``content-type`` (kombu decodes the body by it; ``content-encoding`` defaults to utf-8);
- properties ``delivery_info`` (exchange and routing key: kombu's Redis ``QoS.append`` reads both with
  ``[]``) and ``delivery_tag`` (kombu's and this product's handle on a held message). ``correlation_id``,
  ``reply_to`` (results are ignored), ``priority`` and ``delivery_mode`` are read with defaults, if at all.

Messages written before (every header, base64 body: ``tests/legacy_messages.py`` keeps that builder) still
decode everywhere: kombu follows each message's ``body_encoding``, and so does :func:`decode_body`.
``tests/unit/test_envelope.py`` pins what a Celery worker reads from both against Celery's own message.

Example::

    >>> ((queue, message),) = TaskMessages().build({"id": "e1", "operation": "track"}, ["loops"])
    >>> queue, json.loads(message)["headers"]
    ('loops', {'task': 'worker.deliver', 'id': 'e1.loops', 'argsrepr': "('loops', <track>)"})
    >>> decode_body(json.loads(message))
    [['loops', {'id': 'e1', 'operation': 'track'}], {}, {}]
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from typing import Any

from .keys import HEADER

#: The task's name: what a worker runs for each message.
DELIVER_TASK = "worker.deliver"

#: One queued message: (queue, serialized message); ``("", command, ...)`` is a Redis command sent with them.
Message = tuple[str, ...]

_COMPACT = (",", ":")


def argsrepr(vendor: str, operation: Any) -> str:
    """The args summary Flower shows for a delivery: the vendor and the operation (the event id is in the task id).

    >>> argsrepr("loops", "track")
    "('loops', <track>)"
    """
    return f"('{vendor}', <{operation}>)"


def delivery_tag() -> str:
    """A new message's delivery tag: 96 random bits in 16 characters (kombu's and the retry schedule's handle on
    one message)."""
    return base64.urlsafe_b64encode(os.urandom(12)).decode()


def decode_body(envelope: Mapping[str, Any]) -> Any:
    """The protocol-2 body ``[args, kwargs, embed]`` of a message of either format, read as kombu reads it:
    base64 when ``properties.body_encoding`` says so (messages written before compact ones, and Celery's own),
    else the JSON text as it is. Raises ValueError (or TypeError, KeyError) for a body that is neither."""
    body = envelope["body"]
    properties = envelope.get("properties")
    encoding = properties.get("body_encoding") if isinstance(properties, Mapping) else None
    if encoding and str(encoding).lower() != "utf-8":
        if str(encoding).lower() != "base64":
            raise ValueError(f"unknown body_encoding {encoding!r}")
        body = base64.b64decode(body)
    return json.loads(body)


class TaskMessages:
    """Serialized ``worker.deliver`` messages: compact Celery protocol-2 messages (see the module's notes)."""

    def __init__(self) -> None:
        self._head = ('{"body":%s,"content-type":"application/json","headers":{"task":' + json.dumps(DELIVER_TASK)
                      + ',"id":%s,"argsrepr":%s')
        self._tail = '},"properties":{"delivery_info":{"exchange":"","routing_key":%s},"delivery_tag":"%s"}}'

    def _message(self, vendor: str, event_json: str, task_id: str, operation: Any, extra: str = "") -> str:
        body = f"[[{json.dumps(vendor)},{event_json}],{{}},{{}}]"
        return (self._head % (json.dumps(body), json.dumps(task_id), json.dumps(argsrepr(vendor, operation)))
                + extra + self._tail % (json.dumps(vendor), delivery_tag()))

    def build(self, payload: dict[str, Any], vendors: list[str], task_id_suffix: str = "",
              event_json: str | None = None, persons: dict[str, str] | None = None) -> list[Message]:
        """One (queue, message) per vendor; the task arguments are ``(vendor, payload)``. ``persons``: vendor ->
        person id, for the vendors whose message is kept in its person's order (the header says whose)."""
        event_json = event_json or json.dumps(payload, separators=_COMPACT)
        event_id, operation = payload["id"], payload["operation"]
        persons = persons or {}
        out: list[Message] = []
        for vendor in vendors:
            person = persons.get(vendor)
            extra = "" if person is None else f",{json.dumps(HEADER)}:{json.dumps(person)}"
            out.append((vendor, self._message(vendor, event_json, f"{event_id}.{vendor}{task_id_suffix}",
                                              operation, extra)))
        return out

    def retry(self, vendor: str, payload: dict[str, Any], task_id: str, retries: int,
              headers: dict[str, Any]) -> str:
        """The message that runs ``task_id`` again: same task id, ``retries`` as Celery counts them (left out at
        0, Celery's default), a new delivery tag, and ``headers`` added (what the next attempt must know)."""
        extra = {**({"retries": retries} if retries else {}), **headers}
        text = json.dumps(extra, separators=_COMPACT)[1:-1] if extra else ""
        return self._message(vendor, json.dumps(payload, separators=_COMPACT), task_id, payload.get("operation"),
                             "," + text if text else "")
