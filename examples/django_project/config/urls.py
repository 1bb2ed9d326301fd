"""URLs of the Django example, e.g. ``POST /signup``."""

from django.urls import path
from signups import views

urlpatterns = [
    path("health", views.health),
    path("signup", views.signup),
    path("segments", views.segments),
]
