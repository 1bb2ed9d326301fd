"""A team and its members, e.g. ``Member.objects.create(email=..., name=..., team=team)``."""

import uuid

from django.db import models


class Team(models.Model):
    name = models.CharField(max_length=100, unique=True)


class Member(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    email = models.EmailField(unique=True)
    name = models.CharField(max_length=100)
    team = models.ForeignKey(Team, on_delete=models.CASCADE)
