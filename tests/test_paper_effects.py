"""experiments/paper_effects.py --quick end to end: tables produced, numbers finite (not that the effects appear)."""

from __future__ import annotations

import json
import math

import pytest

from experiments import effects_report, paper_effects


def _numbers(obj):
    """Every int/float in a nested JSON structure (bools excluded)."""
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _numbers(value)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.mark.slow
def test_quick_run_writes_tables_with_finite_numbers(tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "results.md").write_text("# Results\n\nCommentary kept across runs.\n")
    paper_effects.main(["--quick", "--out", str(out)])

    page = (out / "results.md").read_text()
    assert "Commentary kept across runs." in page
    assert page.count(effects_report.BEGIN) == 1 and page.count(effects_report.END) == 1
    for heading in ("## 1. Crop conditioning", "## 2. Size conditioning", "## 3. Table 2 analogue",
                    "## 4. Refiner"):
        assert heading in page
    for png in ("crop_conditioning", "size_conditioning", "table2_models", "refiner"):
        assert (out / "results" / f"{png}.png").stat().st_size > 0
        assert f"results/{png}.png" in page

    results = json.loads((out / "results.json").read_text())
    numbers = list(_numbers(results))
    assert numbers and all(math.isfinite(v) for v in numbers)
    quick = paper_effects.QUICK
    assert [r["c_crop"] for r in results["crop"]["rows"]] == list(quick.crop_magnitudes)
    assert [r["c_size"] for r in results["size"]["rows"]] == list(quick.size_values)
    table2 = results["table2"]["rows"]
    assert len(table2) == 3
    for row in table2:
        for key in ("fid_random_features", "colour_hist_distance", "hf_energy", "hf_energy_gap"):
            assert row[key] is not None and math.isfinite(row[key])
    # The ">= 32 px only" model trains on a strict subset of the data, and says so.
    pools = {row["model"]: row["train_pool"] for row in table2}
    assert pools["only originals >= 32 px"] < pools["size-conditioned (all data)"] == quick.n_train
    assert all(row["hf_energy"] is not None for row in results["refiner"]["rows"])


def test_results_page_keeps_commentary_around_the_generated_block(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(f"intro\n{effects_report.BEGIN}\nold\n{effects_report.END}\ncommentary\n")
    effects_report.write_results_page(str(path), "new tables")
    text = path.read_text()
    assert "intro" in text and "commentary" in text and "new tables" in text and "old" not in text


def test_correlation_is_none_when_undefined():
    assert effects_report.correlation([1, 2, 3], [0.5, 0.5, 0.5])["spearman"] is None
    assert effects_report.correlation([1, 2], [1.0, 2.0])["pearson"] is None
    both = effects_report.correlation([1, 2, 3, 4], [1.0, None, 3.0, 5.0])
    assert both["n"] == 3 and both["spearman"] == pytest.approx(1.0)
