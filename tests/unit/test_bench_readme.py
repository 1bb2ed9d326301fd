"""The Performance table ``make bench`` writes into docs/performance.md: JSON -> markdown between the markers,
nothing else touched."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from tests.benchmarks.readme import BEGIN, END, PAGE, PageError, main, render_markdown, replace_between, update_page
from tests.benchmarks.stack import Row, Sizes, spread

PAGE_TEXT = f"""# Performance

Intro text | with a pipe.

## Performance

Prose before the table.

{BEGIN}
| old | table |
|---|---|
| 0.83 | hand-copied |
{END}

Prose after the table: 1.06.
"""


def bench_doc(smoke: bool = False, errors: list[str] | None = None) -> dict:
    rows = [
        Row.repeated("deliveries/s vs no-op tasks/s", [300.0, 320.0, 280.0], [400.0, 410.0, 390.0], "/s",
                     at_least=0.70, notes="threads pool | 32 threads"),
        Row.repeated("enqueue p50", [240.0, 250.0, 230.0], [150.0, 140.0, 160.0], "µs", at_most=2.0),
        Row("worker peak RSS", 100.2, None, "MB", "<= 150 MB", None, True),
        Row.compare("producer call p100 vs PUBLISH_TIMEOUT", 260.0, 250.0, "ms", at_most=1.0),
    ]
    return {
        "environment": {"date": "2026-11-24T09:30:00+00:00", "cpu_count": 2, "cpu_model": "AMD EPYC",
                        "load_average_at_start": [1.5, 0.75, 0.25], "load_average_at_end": [3.0, 2.5, 1.0],
                        "python": "3.11.9", "git_commit": "abc1234+dirty"},
        "sizes": asdict(Sizes.small() if smoke else Sizes.full()),
        "elapsed_seconds": 1260.0,
        "errors": errors or [],
        "rows": [asdict(r) for r in rows],
    }


def test_a_repeated_row_is_the_median_with_its_range_and_a_ratio_of_medians():
    row = Row.repeated("x", [280.0, 320.0, 300.0], [390.0, 410.0, 400.0], "/s", at_least=0.70)
    assert (row.ours, row.baseline, row.runs) == (300.0, 400.0, 3)
    assert row.ratio == pytest.approx(0.75) and row.met is True
    assert row.ours_stats == {"values": [280.0, 320.0, 300.0], "median": 300.0, "min": 280.0, "max": 320.0}
    assert spread([1.0, 4.0, 2.0, 3.0])["median"] == 2.5


def test_the_markdown_names_when_where_and_what_and_shows_medians_with_ranges():
    md = render_markdown(bench_doc())
    lines = md.splitlines()
    assert lines[0].startswith("Written by `make bench` on 2026-11-24 09:30:00 UTC: 2 CPUs (AMD EPYC)")
    assert "load average (1, 5, 15 min) at start 1.50, 0.75, 0.25 (at the end 3.00, 2.50, 1.00)" in lines[0]
    assert "Python 3.11.9" in lines[0] and "commit `abc1234+dirty`" in lines[0] and "21 min" in lines[0]
    assert "| figure | ours | baseline | ratio | target | met |" in lines
    assert ("| deliveries/s vs no-op tasks/s [1] | 300.0 /s (280.0–320.0) | 400.0 /s (390.0–410.0) | 0.75 "
            "| >= 0.7 | ✔ |") in lines
    assert "| enqueue p50 | 240.0 µs (230.0–250.0) | 150.0 µs (140.0–160.0) | 1.60 | <= 2x | ✔ |" in lines
    assert "| worker peak RSS | 100.2 MB | — | — | <= 150 MB | ✔ |" in lines
    assert "| producer call p100 vs PUBLISH_TIMEOUT | 260.0 ms | 250.0 ms | 1.04 | <= 1x | ✘ |" in lines
    assert any("median of 3 runs" in line and "from the medians" in line for line in lines)
    assert "1. threads pool \\| 32 threads" in lines, "notes are footnotes, pipes escaped"


def test_broken_groups_are_named_in_the_table():
    md = render_markdown(bench_doc(errors=["memory: BenchError: 3 lost"]))
    assert "**Broken in this run** (figures missing): memory: BenchError: 3 lost" in md


def test_only_the_text_between_the_markers_changes_and_a_second_run_changes_nothing(tmp_path):
    page, data = tmp_path / "performance.md", tmp_path / "bench.json"
    page.write_text(PAGE_TEXT)
    data.write_text(json.dumps(bench_doc()))
    assert update_page(data, page) is True
    once = page.read_text()
    before, after = PAGE_TEXT.split(BEGIN)[0], PAGE_TEXT.split(END)[1]
    assert once.startswith(before + BEGIN + "\n") and once.endswith(END + after)
    assert "hand-copied" not in once and "| 0.83 |" not in once
    assert once.split(BEGIN)[1].split(END)[0].strip() == render_markdown(bench_doc())
    assert update_page(data, page) is False
    assert page.read_text() == once
    assert replace_between(once, render_markdown(bench_doc())) == once


def test_a_smoke_json_or_a_page_without_markers_is_refused(tmp_path, capsys):
    page, data = tmp_path / "performance.md", tmp_path / "bench.json"
    page.write_text(PAGE_TEXT)
    data.write_text(json.dumps(bench_doc(smoke=True)))
    with pytest.raises(PageError, match="smoke"):
        update_page(data, page)
    assert page.read_text() == PAGE_TEXT
    data.write_text(json.dumps(bench_doc()))
    for broken in (PAGE_TEXT.replace(END, ""), PAGE_TEXT.replace(BEGIN, ""), PAGE_TEXT + BEGIN,
                   PAGE_TEXT.replace(BEGIN, "@@").replace(END, BEGIN).replace("@@", END)):
        page.write_text(broken)
        assert main([str(data), "--page", str(page)]) == 1
        assert page.read_text() == broken
    assert "not updated" in capsys.readouterr().err


def test_the_command_rewrites_the_table(tmp_path, capsys):
    page, data = tmp_path / "performance.md", tmp_path / "bench.json"
    page.write_text(PAGE_TEXT)
    data.write_text(json.dumps(bench_doc()))
    assert main([str(data), "--page", str(page)]) == 0
    assert "table rewritten" in capsys.readouterr().out
    assert "300.0 /s (280.0–320.0)" in page.read_text()


def test_the_performance_page_has_the_markers_once_and_the_readme_none():
    from tests.benchmarks.stack import REPO

    assert PAGE == REPO / "docs" / "performance.md"
    text = PAGE.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and text.index(BEGIN) < text.index(END)
    readme = (REPO / "README.md").read_text()
    assert BEGIN not in readme and END not in readme, "make bench writes the table in docs/performance.md only"
