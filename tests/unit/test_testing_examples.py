"""The web examples' own tests (examples/*/test_app.py: each app tested with the ``vdw_events`` fixture, as an
app's test suite would use it) pass — each example is a project of its own, so each runs in its own pytest,
as ``pytest examples/<app>`` from the repository root. They run with no vendor credentials and Redis at a
port nobody listens on with the spool off: a call that escaped the recorder would fail its request."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from worker.dev.localstack import VENDOR_ENV_PREFIXES, free_port

ROOT = Path(__file__).resolve().parents[2]
#: Each example's tests, and how many there are (a test file that stopped being collected fails here too).
EXAMPLES = {"flask_app": 4, "fastapi_app": 4, "django_project": 5}


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_the_examples_own_tests_pass(example, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", *VENDOR_ENV_PREFIXES)) and k not in ("ALLOW_NO_VENDORS", "DATABASE_URL")}
    env.update(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SPOOL_ENABLED="false", SPOOL_DIR=str(tmp_path / "spool"),
               DJANGO_DB=str(tmp_path / "django.sqlite3"), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"examples/{example}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(rf"\b{EXAMPLES[example]} passed\b", result.stdout), output
    assert not (tmp_path / "spool").exists()
