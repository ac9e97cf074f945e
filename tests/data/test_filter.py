"""Filter: reject reasons on corrupt inputs, dedup across chunks, aspect modes, score thresholds, never small."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from stages.data import filter as filter_stage
from stages.data import ingest, records, sources
from stages.data.filter import FilterOptions, filter_table, find_duplicates
from tests.data.corrupt_inputs import EXPECTED, EXPECTED_SIZES, build_corrupt_folder


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> pa.Table:
    root = build_corrupt_folder(tmp_path_factory.mktemp("corrupt"))
    plan, _ = sources.plan_folder(str(root), 1000, sources.IMAGE_EXTENSIONS)
    table, _ = ingest.ingest_chunk(plan[0], 2000)
    return table


def _duplicates(table: pa.Table) -> dict[str, str]:
    return find_duplicates(table.column("key").to_pylist(),
                           [filter_stage.sha256_hex(b) for b in table.column("image").to_pylist()])


def test_corrupt_inputs_get_the_right_reasons(ingested):
    kept, rejects = filter_table(ingested, FilterOptions(), _duplicates(ingested))
    reasons = {r["key"]: r["reason"] for r in rejects.to_pylist()}
    assert all(r["stage"] == "filter" and r["detail"] for r in rejects.to_pylist())
    outcome = {**reasons, **{k: "kept" for k in kept.column("key").to_pylist()}}
    assert outcome == EXPECTED
    rows = {r["key"]: r for r in kept.to_pylist()}
    for key, size in EXPECTED_SIZES.items():
        assert (rows[key]["orig_h"], rows[key]["orig_w"]) == size
    assert kept.schema == records.FILTER_SCHEMA
    assert all(rows[k]["sha256"] and rows[k]["clip_score"] is None for k in rows)  # no scorer: null scores


def test_small_images_are_never_rejected(ingested):
    strict = FilterOptions(min_aspect=0.5, max_aspect=2.0)
    kept, _ = filter_table(ingested, strict, {})
    sizes = {r["key"]: min(r["orig_h"], r["orig_w"]) for r in kept.to_pylist()}
    assert sizes["small64"] == 64 and sizes["caption_missing"] == 40


def test_out_of_range_clamp_keeps_and_flags(ingested):
    kept, rejects = filter_table(ingested, FilterOptions(out_of_range="clamp"), {})
    row = next(r for r in kept.to_pylist() if r["key"] == "aspect_5x1")
    assert "aspect_clamped" in records.load_meta(row["meta_json"])["flags"]
    assert "aspect_out_of_range" not in rejects.column("reason").to_pylist()


def test_find_duplicates_is_order_independent():
    keys, hashes = ["c", "a", "b", "d"], ["h1", "h1", "h2", "h1"]
    assert find_duplicates(keys, hashes) == {"c": "a", "d": "a"}
    assert find_duplicates(keys[::-1], hashes[::-1]) == {"c": "a", "d": "a"}


class FakeScorer:
    """Scores from the caption text, so a test can choose which rows fail which threshold."""

    def score(self, images, captions):
        assert all(img.mode == "RGB" for img in images)
        table = {"good": (0.9, 7.0, 0.1, 0.0), "blurry": (0.9, 2.0, 0.1, 0.0), "mark": (0.9, 7.0, 0.9, 0.0),
                 "lewd": (0.9, 7.0, 0.1, 0.95), "offtopic": (0.05, 7.0, 0.1, 0.0)}
        values = np.array([table[c] for c in captions], dtype=np.float32)
        return {name: values[:, i] for i, name in enumerate(records.SCORE_COLUMNS)}


def test_score_thresholds(ingested):
    captions = {"ok_jpeg": "good", "cmyk": "blurry", "deep16": "mark", "palette": "lewd", "rgba": "offtopic"}
    good = [{**r, "caption": captions[r["key"]]} for r in ingested.to_pylist() if r["key"] in captions]
    table = records.table_from_rows(good, records.INGEST_SCHEMA)
    opts = FilterOptions(min_clip_score=0.2, min_aesthetic=4.5, max_watermark=0.5, max_nsfw=0.5, score_batch_size=2)
    kept, rejects = filter_table(table, opts, {}, scorer=FakeScorer())
    assert kept.column("key").to_pylist() == ["ok_jpeg"]
    assert kept.column("aesthetic_score").to_pylist() == [pytest.approx(7.0)]
    assert {r["key"]: r["reason"] for r in rejects.to_pylist()} == {
        "cmyk": "low_aesthetic_score", "deep16": "high_watermark_prob", "palette": "high_nsfw_prob",
        "rgba": "low_clip_score"}
    off = FilterOptions()  # thresholds off: scores recorded, nothing rejected for them
    kept, rejects = filter_table(table, off, {}, scorer=FakeScorer())
    assert kept.num_rows == 5 and rejects.num_rows == 0


def test_a_failing_scorer_rejects_only_the_culprit(ingested):
    class Picky(FakeScorer):
        def score(self, images, captions):
            if "boom" in captions:
                raise RuntimeError("scorer exploded")
            return super().score(images, captions)

    rows = [{**r, "caption": "boom" if r["key"] == "cmyk" else "good"} for r in ingested.to_pylist()
            if r["key"] in ("ok_jpeg", "cmyk", "rgba")]
    kept, rejects = filter_table(records.table_from_rows(rows, records.INGEST_SCHEMA), FilterOptions(), {},
                                 scorer=Picky())
    assert sorted(kept.column("key").to_pylist()) == ["ok_jpeg", "rgba"]
    assert [(r["key"], r["reason"]) for r in rejects.to_pylist()] == [("cmyk", "scoring_failed")]


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="filter.out_of_range"):
        FilterOptions(out_of_range="drop")
    with pytest.raises(ValueError, match="filter.min_aspect"):
        FilterOptions(min_aspect=5.0, max_aspect=4.0)


@pytest.mark.integration
def test_filter_stage_dedups_across_chunks(ray_local, tmp_path, make_ctx):
    from tests.data import data_cfg

    root = build_corrupt_folder(tmp_path / "src")
    ctx = make_ctx("filter")
    cfg = data_cfg(**{"ingest.source": str(root), "ingest.chunk_size": 5})
    ingest.run(cfg, ctx)
    counts = filter_stage.run(cfg, ctx)
    kept_n = sum(1 for v in EXPECTED.values() if v == "kept")
    assert counts["kept"] == kept_n and counts["rejected"] == len(EXPECTED) - kept_n
    assert counts["rejects_by_reason"]["duplicate"] == 1  # dup_a and dup_b sit in different chunks


@pytest.mark.slow  # importing open_clip and building even a tiny CLIP takes ~10 s on the test machine
def test_real_scorer_fills_score_columns_and_thresholds_apply(ingested):
    from omegaconf import OmegaConf

    from stages.data.scorers import ImageTextScorer
    from tests.data.test_scorers import TINY_CLIP

    section = OmegaConf.create({"enabled": True, "arch": "test-tiny-clip", "pretrained": None,
                                "model_config": TINY_CLIP, "random_init_ok": True, "device": "cpu", "batch_size": 4,
                                "seed": 0})
    scorer = ImageTextScorer.from_config(section)
    good = records.table_from_rows([r for r in ingested.to_pylist() if EXPECTED[r["key"]] == "kept"][:6],
                                   records.INGEST_SCHEMA)
    kept, rejects = filter_table(good, FilterOptions(score_batch_size=4), {}, scorer=scorer)
    assert kept.num_rows == 6 and rejects.num_rows == 0
    assert kept.column("clip_score").null_count == 0 and kept.column("aesthetic_score").null_count == 0
    assert kept.column("watermark_prob").null_count == 6  # no watermark head configured: null
    kept, rejects = filter_table(good, FilterOptions(min_clip_score=101.0), {}, scorer=scorer)  # CLIPScore <= 100
    assert kept.num_rows == 0 and set(rejects.column("reason").to_pylist()) == {"low_clip_score"}
    assert filter_stage.build_scorer(OmegaConf.create({"enabled": False, "arch": "unused"})) is None
