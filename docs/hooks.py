"""MkDocs hook: the Configuration page's table, generated from ``worker.settings.Settings``.

``docs/configuration.md`` holds the marker ``<!-- settings:table -->``; :func:`on_page_markdown` replaces it
with one row per Settings field: the environment variable, its type, its default and its description (the
field's ``description=``, else the ``#:`` comment lines right above it in ``worker/settings.py``). Nothing is
kept by hand, so the page cannot drift from the code; ``tests/unit/test_docs.py`` fails on a field without a
description. ``python docs/hooks.py`` prints the table.

Example::

    >>> row = next(r for r in settings_rows() if r.env == "CONVEYOUR_BATCH_SIZE")
    >>> (row.name, row.type, row.default)
    ('conveyour_batch_size', 'int, ≥ 1', '`50`')
    >>> row.description
    'Most ConveYour identify/segment calls in one bulk request; 1 = no batching.'
    >>> settings_table().splitlines()[0]
    '| variable | type | default | meaning |'
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from pydantic import SecretStr
from pydantic_core import PydanticUndefined

from worker.settings import Settings

#: The line in docs/configuration.md that the table replaces.
MARKER = "<!-- settings:table -->"
#: The page (relative to docs/) that holds the marker.
PAGE = "configuration.md"


@dataclass(frozen=True)
class SettingRow:
    """One Settings field as the Configuration page shows it."""

    name: str  #: the field's name in Settings
    env: str  #: the environment variable that sets it
    type: str
    default: str
    description: str


def comments() -> dict[str, str]:
    """Each field's ``#:`` comment (the consecutive ``#:`` lines right above it), joined into one line."""
    lines, _ = inspect.getsourcelines(Settings)
    source = textwrap.dedent("".join(lines))
    text = source.splitlines()
    found: dict[str, str] = {}
    cls = ast.parse(source).body[0]
    assert isinstance(cls, ast.ClassDef)
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above: list[str] = []
            i = node.lineno - 2  # the line above, 0-based
            while i >= 0 and text[i].strip().startswith("#:"):
                above.insert(0, text[i].strip()[2:].strip())
                i -= 1
            found[node.target.id] = " ".join(above).strip()
    return found


def _markdown(text: str) -> str:
    """reST-isms of docstrings and comments as Markdown: ``x`` and :role:`x` become `x`; pipes escaped."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`").replace("|", "\\|")


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner)
    if annotation is SecretStr:
        return "secret str"
    if get_origin(annotation) is dict:
        return "JSON object"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _bounds(metadata: list[Any]) -> list[str]:
    out = []
    for item in metadata:
        for attr, sign in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{sign} {_number(value)}")
    return out


def _number(value: float | int) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return f"`{_number(value)}`"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def settings_rows() -> list[SettingRow]:
    """Every Settings field, in the order ``worker/settings.py`` declares them."""
    config = Settings.model_config
    assert not config.get("case_sensitive"), "the env names below are upper-cased field names"
    prefix = str(config.get("env_prefix") or "")
    notes = comments()
    rows = []
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else None
        env = (alias or prefix + name).upper()
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "required"
        else:
            default = _default(field.get_default(call_default_factory=True))
        kind = ", ".join([_type_name(field.annotation), *_bounds(field.metadata)])
        description = (field.description or notes.get(name, "")).strip()
        rows.append(SettingRow(name, env, kind, default, _markdown(description)))
    return rows


def markdown_row(row: SettingRow) -> str:
    return f"| `{row.env}` | {row.type} | {row.default} | {row.description} |"


def settings_table() -> str:
    """The Markdown table that replaces :data:`MARKER`."""
    head = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(head + [markdown_row(r) for r in settings_rows()])


def render(markdown: str) -> str:
    """``markdown`` with the marker replaced by the table (it must be there exactly once)."""
    if markdown.count(MARKER) != 1:
        raise ValueError(f"{PAGE} must hold {MARKER} exactly once")
    return markdown.replace(MARKER, settings_table())


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """MkDocs event: fill in the Configuration page's table."""
    if page.file.src_uri == PAGE:
        return render(markdown)
    return markdown


if __name__ == "__main__":
    print(settings_table())
