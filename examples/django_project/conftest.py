"""Django under plain pytest (no pytest-django): this project's settings, and a test database made for the
session (SQLite in memory, migrated) and removed after it, as ``manage.py test`` would do."""

from __future__ import annotations

import os

import django
import pytest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup()


@pytest.fixture(scope="session", autouse=True)
def django_test_database():
    from django.test.utils import setup_databases, setup_test_environment, teardown_databases, teardown_test_environment

    setup_test_environment()
    databases = setup_databases(verbosity=0, interactive=False)
    yield
    teardown_databases(databases, verbosity=0)
    teardown_test_environment()
