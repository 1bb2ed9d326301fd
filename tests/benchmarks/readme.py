"""The Performance page's table (``docs/performance.md``), written from a benchmark JSON between two markers.

``make bench`` calls :func:`update_page` with the JSON it just wrote; a later run's
JSON can be put in by hand::

    python -m tests.benchmarks.readme bench-results.json [--page docs/performance.md]

Only the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` changes;
a smoke-size JSON is refused (its numbers measure nothing). Example::

    >>> doc = {"environment": {"date": "2026-11-23T18:00:00+00:00", "cpu_count": 2, "cpu_model": "AMD EPYC",
    ...        "load_average_at_start": [0.5, 0.4, 0.3], "python": "3.11.9", "git_commit": "b69e896"},
    ...        "sizes": {"smoke": False, "repeats": 3}, "elapsed_seconds": 1200.0, "errors": [],
    ...        "rows": [{"figure": "x/s", "ours": 11.0, "baseline": 5.5, "unit": "/s", "target": ">= 1.5",
    ...                  "ratio": 2.0, "met": True, "notes": "", "runs": 3,
    ...                  "ours_stats": {"values": [10.0, 11.0, 12.0], "median": 11.0, "min": 10.0, "max": 12.0},
    ...                  "baseline_stats": None}]}
    >>> print(render_markdown(doc).splitlines()[4])
    | x/s | 11.0 /s (10.0–12.0) | 5.5 /s | 2.00 | >= 1.5 | ✔ |
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .stack import REPO, format_value

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
#: The page whose table a full ``make bench`` rewrites (README.md has no figures table of its own).
PAGE = REPO / "docs" / "performance.md"


class PageError(ValueError):
    """The page has no (or misplaced) markers, or the JSON cannot go in it."""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def provenance(doc: dict[str, Any]) -> str:
    """One line: when, on what machine, with which Python and commit, how long."""
    env = doc.get("environment", {})
    def loads(key: str) -> str:
        load = env.get(key)
        return ", ".join(f"{x:.2f}" for x in load) if load else "unknown"

    load_text = loads("load_average_at_start")
    if env.get("load_average_at_end"):
        load_text += f" (at the end {loads('load_average_at_end')})"
    date = str(env.get("date", "unknown")).replace("T", " ").replace("+00:00", " UTC")
    minutes = doc.get("elapsed_seconds")
    took = f", {minutes / 60:.0f} min" if minutes else ""
    return (f"Written by `make bench` on {date}: {env.get('cpu_count', '?')} CPUs "
            f"({env.get('cpu_model') or 'model unknown'}), load average (1, 5, 15 min) at start {load_text}; "
            f"Python {env.get('python', '?')}; commit `{env.get('git_commit') or 'unknown'}`{took}.")


def render_markdown(doc: dict[str, Any]) -> str:
    """The block that goes between the markers: provenance line, table, footnotes."""
    rows = doc.get("rows", [])
    out = [provenance(doc), "", "| figure | ours | baseline | ratio | target | met |", "|---|---|---|---|---|---|"]
    notes: list[str] = []
    for r in rows:
        figure = _cell(r["figure"])
        if r.get("notes"):
            notes.append(r["notes"])
            figure += f" [{len(notes)}]"
        met = "—" if r.get("met") is None else ("✔" if r["met"] else "✘")
        ratio = "—" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        out.append(f"| {figure} | {_cell(format_value(r.get('ours'), r['unit'], r.get('ours_stats')))} | "
                   f"{_cell(format_value(r.get('baseline'), r['unit'], r.get('baseline_stats')))} | {ratio} | "
                   f"{_cell(r.get('target', '—'))} | {met} |")
    counts = Counter(r["runs"] for r in rows if r.get("runs", 1) > 1)
    out.append("")
    if counts:
        usual = counts.most_common(1)[0][0]
        other = "; ".join(f"{_cell(r['figure'])[:60]}…: {r['runs']}" for r in rows
                          if r.get("runs", 1) > 1 and r["runs"] != usual)
        out.append(f"A value with a range is the median of {usual} runs" + (f" ({other})" if other else "")
                   + " (min–max in brackets); ratios are computed from the medians. Other figures are single runs.")
    else:
        out.append("Every figure is a single run.")
    if doc.get("errors"):
        out.append("")
        out.append("**Broken in this run** (figures missing): " + "; ".join(_cell(e) for e in doc["errors"]))
    if notes:
        out.append("")
        out += [f"{i}. {_cell(n)}" for i, n in enumerate(notes, 1)]
    return "\n".join(out)


def replace_between(text: str, block: str) -> str:
    """``text`` with everything between the markers replaced by ``block``; the rest untouched."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise PageError(f"the page needs exactly one {BEGIN} followed by one {END}")
    return text[: start + len(BEGIN)] + "\n" + block.strip("\n") + "\n" + text[end:]


def update_page(json_path: str | Path, page_path: str | Path = PAGE) -> bool:
    """Rewrite the page's table from ``json_path``; returns whether the page changed."""
    doc = json.loads(Path(json_path).read_text())
    if doc.get("sizes", {}).get("smoke"):
        raise PageError(f"{json_path} is a smoke run: its figures do not go in the docs")
    page = Path(page_path)
    before = page.read_text()
    after = replace_between(before, render_markdown(doc))
    if after != before:
        page.write_text(after)
    return after != before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.readme",
                                     description="Rewrite the docs' Performance table from a benchmark JSON.")
    parser.add_argument("json", help="e.g. bench-results.json")
    parser.add_argument("--page", default=str(PAGE), help="the page with the markers (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        changed = update_page(args.json, args.page)
    except (PageError, OSError, json.JSONDecodeError) as exc:
        print(f"{args.page} not updated: {exc}", file=sys.stderr)
        return 1
    print(f"{args.page}: table {'rewritten' if changed else 'already up to date'} from {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
