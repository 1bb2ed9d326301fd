"""WSGI entry point (``runserver`` serves it too, e.g. ``gunicorn config.wsgi``); it checks the vendor setup.

A web process with no vendor enabled refuses to start (``ALLOW_NO_VENDORS=true``
lets events go nowhere instead); management commands such as ``migrate`` never
load this module, so they run without vendor settings.
"""

import os

from django.core.wsgi import get_wsgi_application

import worker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
worker.check_configuration()
application = get_wsgi_application()
