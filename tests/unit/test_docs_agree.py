"""README and docs/ agree with the Makefile (durations, compose) and with the demo's options; make compose-check picks
Docker Compose v2, else v1, else says what is missing (run with stand-in docker CLIs that record their arguments).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from worker.dev import demo

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
#: The README and every page of the docs site, one text.
DOCS = "\n".join([README, *(p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").glob("*.md")))])
MAKEFILE = (REPO / "Makefile").read_text(encoding="utf-8")
DURATION = r"about ([0-9½.\-–]+) minutes"


def documented_durations(command: str) -> set[str]:
    """The durations the README and the docs state on a ``make ... # about N minutes`` line."""
    lines = [line for line in DOCS.splitlines() if re.match(rf"{re.escape(command)}\s+#", line)]
    return {re.search(DURATION, line).group(1) for line in lines if re.search(DURATION, line)}


def makefile_duration(target: str) -> str:
    """The duration in the comment block right above ``target:``."""
    lines = MAKEFILE.splitlines()
    at = lines.index(next(line for line in lines if line.startswith(f"{target}:")))
    comment = []
    for line in reversed(lines[:at]):
        if not line.startswith("#"):
            break
        comment.append(line)
    return re.search(DURATION, " ".join(reversed(comment))).group(1)


@pytest.mark.parametrize("target", ["bench", "bench-smoke"])
def test_docs_and_makefile_state_the_same_duration(target):
    assert documented_durations(f"make {target}") == {makefile_duration(target)}


def test_the_docs_name_every_demo_option():
    options = [o for action in demo.parser()._actions for o in action.option_strings if o.startswith("--")]
    assert "--flower-port" in options
    page = (REPO / "docs" / "getting-started.md").read_text(encoding="utf-8")
    missing = [o for o in options if o != "--help" and o not in page]
    assert not missing, f"docs/getting-started.md does not mention {missing}"


def test_the_docs_run_compose_v2():
    assert "docker compose -f docker/compose.yaml up" in DOCS
    assert "docker-compose -f" not in DOCS


MAKE = shutil.which("make")


def _fake(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _compose_check(tmp_path: Path, docker_v2: bool | None, v1: bool) -> tuple[subprocess.CompletedProcess, str]:
    """``make compose-check`` with only stand-ins on PATH: ``docker`` (with or without the compose plugin,
    or none when ``docker_v2`` is None) and ``docker-compose`` (if ``v1``). Returns what ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    record = f'echo "${{0##*/}} $* FLOWER_BASIC_AUTH=$FLOWER_BASIC_AUTH" >> {calls}\n'
    if docker_v2 is not None:
        compose = ":; " if docker_v2 else "echo 'unknown command' >&2; exit 1; "
        plugin = 'if [ "$1" = compose ]; then ' + compose + "fi\n"
        _fake(bin_dir, "docker", plugin + 'if [ "$2" = version ]; then exit 0; fi\n' + record)
    if v1:
        _fake(bin_dir, "docker-compose", record)
    env = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/tmp")}
    out = subprocess.run([MAKE, "-s", "compose-check"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    return out, calls.read_text() if calls.exists() else ""


needs_make = pytest.mark.skipif(MAKE is None, reason="make is not installed")


@needs_make
def test_compose_check_uses_docker_compose_v2(tmp_path):
    out, ran = _compose_check(tmp_path, docker_v2=True, v1=True)
    assert out.returncode == 0, out.stderr
    assert ran == "docker compose -f docker/compose.yaml config -q FLOWER_BASIC_AUTH=user:password\n"


@needs_make
def test_compose_check_falls_back_to_docker_compose_v1(tmp_path):
    out, ran = _compose_check(tmp_path, docker_v2=False, v1=True)
    assert out.returncode == 0, out.stderr
    assert ran == "docker-compose -f docker/compose.yaml config -q FLOWER_BASIC_AUTH=user:password\n"


@needs_make
def test_compose_check_without_compose_says_what_is_missing(tmp_path):
    out, ran = _compose_check(tmp_path, docker_v2=None, v1=False)
    assert out.returncode != 0 and ran == ""
    assert "needs Docker Compose: the docker compose plugin (v2) or docker-compose (v1)" in out.stderr
