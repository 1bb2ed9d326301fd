"""The docs cannot drift: every setting is described on the generated Configuration page, the README fits on a
page and its links lead somewhere, and CI builds the site and runs the doctests.

The site itself is built by ``make docs`` (``mkdocs build --strict``: a broken link or anchor between pages
fails it); these tests need no MkDocs.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest

from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README = REPO / "README.md"
README_MAX_LINES = 250


def _hooks() -> ModuleType:
    """docs/hooks.py, the MkDocs hook that renders the settings table (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("vdw_docs_hooks", DOCS / "hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as MkDocs loads a hook (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


def generated_configuration_page() -> str:
    """docs/configuration.md as MkDocs renders it: the marker replaced by the hook's table."""
    return hooks.render((DOCS / hooks.PAGE).read_text(encoding="utf-8"))


def test_mkdocs_runs_the_hook():
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^hooks:\s*\n\s*-\s*docs/hooks\.py\s*$", config, re.M), "mkdocs.yml must list docs/hooks.py"
    assert (DOCS / hooks.PAGE).read_text(encoding="utf-8").count(hooks.MARKER) == 1


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_has_a_description_on_the_generated_page(name):
    rows = {row.name: row for row in hooks.settings_rows()}
    row = rows[name]
    assert row.env == name.upper()
    assert row.description, (f"Settings.{name} has no description: write a `#:` comment above it in "
                             "worker/settings.py (it becomes its line on the Configuration page)")
    page = generated_configuration_page()
    line = next((line for line in page.splitlines() if line.startswith(f"| `{row.env}` |")), None)
    assert line is not None, f"{row.env} is not in the Configuration page's table"
    assert row.description in line and row.default in line and row.type in line


def test_the_generated_table_has_one_row_per_setting_and_nothing_else():
    page = generated_configuration_page()
    listed = re.findall(r"^\| `([A-Z0-9_]+)` \|", page, re.M)
    assert listed == [name.upper() for name in Settings.model_fields]
    assert hooks.MARKER not in page


def test_a_field_without_a_comment_has_an_empty_description():
    """The check above can fail: the comment parser reads only the `#:` lines right above a field."""
    comments = hooks.comments()
    assert set(comments) == set(Settings.model_fields)
    assert comments["key_prefix"].startswith("Prefix of the Redis keys")
    assert "#:" not in " ".join(comments.values())


def test_the_readme_fits_on_a_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
                                            "move the detail to a page under docs/ and link it")


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (what MkDocs names a heading's anchor)."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(markdown_file: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown_file.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def _relative_links(markdown_file: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown_file.read_text(encoding="utf-8"), flags=re.S)
    targets = re.findall(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # no http:, https:, mailto:


def test_every_relative_link_in_the_readme_leads_to_a_file_and_anchor():
    links = _relative_links(README)
    assert any(link.startswith("docs/") for link in links), "the README links into docs/"
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (README.parent / path) if path else README
        if not target.exists():
            broken.append(f"{link}: no file {path}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {path or 'README.md'}")
    assert not broken, "README.md links lead nowhere:\n" + "\n".join(broken)


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nsee [a](docs/nowhere.md) and [b](https://example.org) and [c](#title)\n"
                    "```\n[not a link](skipped.md)\n```\n")
    assert _relative_links(page) == ["docs/nowhere.md", "#title"]
    assert _anchors(page) == {"title"}
    assert _slug("Redis: TLS and Sentinel") == "redis-tls-and-sentinel"


def _ci_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_ci_builds_the_docs_and_runs_the_doctests_after_lint_before_the_tests():
    commands = _ci_commands()
    order = [commands.index(c) for c in ("make lint", "make docs", "make doctest", "make test")]
    assert order == sorted(order), commands
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^docs:.*\n(\t.*\n)*\t.*mkdocs build --strict", makefile, re.M)
    assert re.search(r"^doctest:.*\n(\t.*\n)*\t.*pytest .*--doctest-modules", makefile, re.M)
