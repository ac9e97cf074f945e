"""The README's performance table is written from benchmarks/results.json, never typed: benchmarks/performance_table."""

from __future__ import annotations

from benchmarks import performance_table as pt


def test_rows_show_figures_or_say_why_not():
    results = {
        "cache": {"speedup": 1.234, "measured_at": "2026-01-02 03:04 UTC"},
        "load": {"error": "TimeoutError: Ray did not start"},
        "serve_fault": {"gap_s": 9.0},  # an older version's figures: a key the row needs is missing
    }
    rows = {line.split("`")[1]: line for line in pt.table(results).splitlines()[2:]}
    assert set(rows) == {name for name, *_ in pt.ROWS}
    assert "**1.23×** faster cached" in rows["cache"] and "2026-01-02 03:04 UTC" in rows["cache"]
    assert "failed: TimeoutError: Ray did not start" in rows["load"]
    assert "re-run `python benchmarks/run.py serve_fault`" in rows["serve_fault"]
    assert "not measured yet: `python benchmarks/run.py export`" in rows["export"]


def test_update_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{pt.BEGIN}\n| old | table |\n{pt.END}\n\nafter\n")
    assert pt.update_readme({"cache": {"speedup": 2.0}}, str(readme))
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n" + pt.BEGIN + "\n| benchmark")
    assert text.endswith(pt.END + "\n\nafter\n") and "| old | table |" not in text and "**2.00×**" in text
    plain = tmp_path / "OTHER.md"
    plain.write_text("no markers\n")
    assert not pt.update_readme({}, str(plain)) and plain.read_text() == "no markers\n"


def test_the_readme_has_the_markers():
    text = open(pt.README, encoding="utf-8").read()
    assert text.index(pt.BEGIN) < text.index(pt.END)
