"""ruff and mypy are configured in pyproject.toml, `make lint` runs both, and CI runs it before the tests.

A structural check only: CI running `make lint` is the real one.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _make_recipe(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if re.match(rf"{re.escape(target)}\s*:", line))
    recipe = []
    for line in lines[at + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_ruff_is_configured():
    ruff = PYPROJECT["tool"]["ruff"]
    assert ruff["line-length"] == 120
    assert ruff["target-version"] == "py311"
    assert {"E", "F", "W", "I", "UP", "B"} <= set(ruff["lint"]["select"])


def test_mypy_is_configured():
    mypy = PYPROJECT["tool"]["mypy"]
    assert mypy["python_version"] == "3.11"
    assert mypy["files"] == ["worker", "celeryconfig.py"]
    assert mypy["check_untyped_defs"] and mypy["warn_unused_ignores"] and mypy["no_implicit_optional"]
    untyped = {m for o in mypy["overrides"] if o.get("ignore_missing_imports") for m in o["module"]}
    assert {"celery.*", "kombu.*", "billiard.*", "flower.*"} <= untyped


def test_ruff_and_mypy_are_dev_dependencies():
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    names = {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in dev}
    assert {"ruff", "mypy"} <= names


def test_make_lint_runs_ruff_check_and_mypy():
    recipe = _make_recipe("lint")
    assert any("-m ruff check worker tests examples celeryconfig.py" in line for line in recipe), recipe
    assert any(re.search(r"-m mypy\b", line) for line in recipe), recipe
    assert not any("ruff format" in line for line in recipe), "lint only: ruff format would rewrite every file"


def test_ci_runs_make_lint_after_install_and_before_the_tests():
    commands = _ci_commands()
    assert "make lint" in commands, commands
    order = [commands.index(c) for c in ("make install", "make lint", "make test", "make bench-smoke")]
    assert order == sorted(order), commands
