"""The views: ``POST /signup`` (published on commit) and ``POST /segments``.

``signup`` creates the member, reports ``identify`` + ``track("signed_up")``
through :mod:`worker.oncommit.django`, then creates their team; a taken team
name raises ``IntegrityError``, ``atomic()`` rolls back, and the two calls are
dropped with it. Example::

    curl -s localhost:8000/signup -H 'content-type: application/json' \\
         -d '{"email": "jill@acme.co", "name": "Jill", "team": "acme"}'
"""

import json

from django.db import IntegrityError, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET, require_POST

import worker
from worker.oncommit import django as events

from .models import Member, Team


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


@require_POST
def signup(request: HttpRequest) -> JsonResponse:
    data = json.loads(request.body)
    if not all(isinstance(data.get(k), str) and data[k].strip() for k in ("email", "name", "team")):
        return JsonResponse({"error": "email, name and team are required"}, status=400)
    try:
        with transaction.atomic():
            member = Member(email=data["email"], name=data["name"])
            events.identify(email=member.email, user_id=member.id.hex, traits={"name": member.name,
                                                                                 "team": data["team"]})
            event_id = events.track("signed_up", email=member.email, user_id=member.id.hex,
                                    properties={"team": data["team"]})
            member.team = Team.objects.create(name=data["team"])
            member.save(force_insert=True)
        # published here, as the block commits
    except IntegrityError:
        return JsonResponse({"error": "that email or team name is taken"}, status=409)
    except worker.InvalidEvent as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"user_id": member.id.hex, "event": event_id}, status=201)


@require_POST
def segments(request: HttpRequest) -> JsonResponse:
    data = json.loads(request.body)
    member = Member.objects.filter(email=data.get("email")).first()
    if member is None:
        return JsonResponse({"error": "no such user"}, status=404)
    try:
        event_id = worker.segment(email=member.email, user_id=member.id.hex, add=data.get("add", []),
                                  remove=data.get("remove", []))
    except worker.InvalidEvent as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    except worker.EnqueueError as exc:
        return JsonResponse({"error": str(exc)}, status=503)
    return JsonResponse({"event": event_id})
