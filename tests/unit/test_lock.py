"""requirements.lock pins every dependency pyproject.toml names, and make and the Docker image install from it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_every_dependency_of_the_product_and_its_tests_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = _pinned()
    # The dev extra names the project's own [examples] extra: the project itself is installed from the checkout,
    # never pinned (a pin would be this machine's path).
    missing = sorted({_name(r) for r in wanted} - set(pins) - {project["name"]})
    assert project["name"] not in pins, "the lock pins the project itself at a path: run `make lock`"
    assert not missing, f"not in requirements.lock (run `make lock`): {missing}"
    assert len(pins) > len(wanted), "the lock should pin the dependencies' dependencies too"


def test_make_and_the_image_install_from_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c \$\(LOCK\) -e '\.\[dev\]'", makefile)
    assert re.search(r"^LOCK\s*:=\s*requirements\.lock$", makefile, re.M)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^COPY .*requirements\.lock", dockerfile, re.M)
    assert re.search(r"pip install .*-c requirements\.lock '\.\[gevent\]'$", dockerfile, re.M)
