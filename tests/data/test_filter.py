"""Filter: reject reasons on corrupt inputs, the decode check, dedup, aspect modes, score thresholds, never small."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from stages.data import filter as filter_stage
from stages.data import images, process, records, sources
from stages.data.filter import ScoreOptions, score_table
from stages.data.process import SampleOptions, find_duplicates
from tests.data.corrupt_inputs import EXPECTED, EXPECTED_SIZES, build_corrupt_folder


@pytest.fixture(scope="module")
def raw_samples(tmp_path_factory) -> list[dict]:
    from stages.data import plan

    root = build_corrupt_folder(tmp_path_factory.mktemp("corrupt"))
    items, _ = plan.folder_items("", sorted(p.name for p in root.iterdir() if p.is_file()), sources.IMAGE_EXTENSIONS)
    nested, _ = plan.folder_items("sub", ["nested.png"], sources.IMAGE_EXTENSIONS)
    return list(sources.read_folder_unit({"uri": str(root), "items": items + nested}))


def _outcome(table: pa.Table) -> dict[str, str]:
    return {r["key"]: r["reject_reason"] or "kept" for r in table.to_pylist()}


def test_corrupt_inputs_get_the_right_reasons(raw_samples):
    table = process.process_unit(raw_samples, 0, SampleOptions())
    assert _outcome(table) == EXPECTED
    rows = {r["key"]: r for r in table.to_pylist()}
    for key, size in EXPECTED_SIZES.items():
        assert (rows[key]["orig_h"], rows[key]["orig_w"]) == size
    assert all(r["reject_detail"] for r in rows.values() if r["reject_reason"])
    kept = [r for r in rows.values() if r["reject_reason"] is None]
    assert all(len(r["sha256"]) == 64 and r["clip_score"] is None for r in kept)  # no scorer: null scores
    assert rows["dup_b"]["reject_detail"] == "same bytes as dup_a"
    assert table.schema == records.SAMPLE_SCHEMA


def test_full_and_reduced_decode_checks_agree(raw_samples):
    full = process.process_unit(raw_samples, 0, SampleOptions(decode_check="full"))
    assert _outcome(full) == EXPECTED


def _photo_jpeg(h: int, w: int) -> bytes:
    rng = np.random.default_rng(0)
    small = Image.fromarray((rng.random((h // 8, w // 8, 3)) * 255).astype("uint8")).resize((w, h))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def test_reduced_decode_check_judges_broken_jpegs_as_the_full_decode_does():
    """The reduced check still entropy-decodes every coefficient: truncations always fail, and damaged data fails
    (or, when the damage happens to decode, passes) exactly as under a full decode."""
    rng = np.random.default_rng(1)
    verdicts = {"full": [], "reduced": []}
    for seed in range(12):
        data = _photo_jpeg(320, 480 + 8 * seed)
        cut = int(rng.integers(len(data) // 4, 3 * len(data) // 4))
        damaged = data[:cut] + bytes(rng.integers(0, 256, 500, dtype=np.uint8)) + data[cut + 500:]
        for decode in images.DECODE_CHECKS:
            assert images.check_image(data, 10**9, decode)[1] is None
            assert images.check_image(data[:cut], 10**9, decode)[1] == "undecodable"
            # A missing end marker alone, or damage that happens to decode, may pass: the same way in both modes.
            verdicts[decode] += [images.check_image(damaged, 10**9, decode)[1],
                                 images.check_image(data[:-2], 10**9, decode)[1]]
    assert verdicts["full"] == verdicts["reduced"] and "undecodable" in verdicts["full"]


def test_small_images_are_never_rejected(raw_samples):
    table = process.process_unit(raw_samples, 0, SampleOptions(min_aspect=0.5, max_aspect=2.0))
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["small64"]["reject_reason"] is None and rows["caption_missing"]["reject_reason"] is None
    assert min(rows["caption_missing"]["orig_h"], rows["caption_missing"]["orig_w"]) == 40


def test_out_of_range_clamp_keeps_and_flags(raw_samples):
    table = process.process_unit(raw_samples, 0, SampleOptions(out_of_range="clamp"))
    row = next(r for r in table.to_pylist() if r["key"] == "aspect_5x1")
    assert row["reject_reason"] is None and "aspect_clamped" in records.load_meta(row["meta_json"])["flags"]
    assert (row["bucket_h"], row["bucket_w"]) == (512, 2048)  # the edge bucket


def test_find_duplicates_is_order_independent():
    keys, hashes = ["c", "a", "b", "d"], ["h1", "h1", "h2", "h1"]
    assert find_duplicates(keys, hashes) == {"c": "a", "d": "a"}
    assert find_duplicates(keys[::-1], hashes[::-1]) == {"c": "a", "d": "a"}


class FakeScorer:
    """Scores from the caption text, so a test can choose which rows fail which threshold."""

    def score(self, imgs, captions):
        assert all(img.mode == "RGB" for img in imgs)
        table = {"good": (0.9, 7.0, 0.1, 0.0), "blurry": (0.9, 2.0, 0.1, 0.0), "mark": (0.9, 7.0, 0.9, 0.0),
                 "lewd": (0.9, 7.0, 0.1, 0.95), "offtopic": (0.05, 7.0, 0.1, 0.0)}
        values = np.array([table[c] for c in captions], dtype=np.float32)
        return {name: values[:, i] for i, name in enumerate(records.SCORE_COLUMNS)}


def _scored_table(raw_samples, captions: dict[str, str]) -> pa.Table:
    chosen = [{**s, "caption_raw": captions[s["key"]]} for s in raw_samples if s["key"] in captions]
    return process.process_unit(chosen, 0, SampleOptions())


def test_score_thresholds(raw_samples):
    table = _scored_table(raw_samples, {"ok_jpeg": "good", "cmyk": "blurry", "deep16": "mark", "palette": "lewd",
                                        "rgba": "offtopic", "truncated": "good"})
    opts = ScoreOptions(min_clip_score=0.2, min_aesthetic=4.5, max_watermark=0.5, max_nsfw=0.5, score_batch_size=2)
    out = {r["key"]: r for r in score_table(table, FakeScorer(), opts).to_pylist()}
    assert {k: r["reject_reason"] or "kept" for k, r in out.items()} == {
        "ok_jpeg": "kept", "cmyk": "low_aesthetic_score", "deep16": "high_watermark_prob", "palette": "high_nsfw_prob",
        "rgba": "low_clip_score", "truncated": "undecodable"}  # a row rejected before is passed over
    assert out["ok_jpeg"]["aesthetic_score"] == pytest.approx(7.0) and out["ok_jpeg"]["image"]
    off = score_table(table, FakeScorer(), ScoreOptions())  # thresholds off: scores recorded, nothing rejected
    assert sum(r["reject_reason"] is None for r in off.to_pylist()) == 5


def test_a_failing_scorer_rejects_only_the_culprit(raw_samples):
    class Picky(FakeScorer):
        def score(self, imgs, captions):
            if "boom" in captions:
                raise RuntimeError("scorer exploded")
            return super().score(imgs, captions)

    table = _scored_table(raw_samples, {"ok_jpeg": "good", "cmyk": "boom", "rgba": "good"})
    out = {r["key"]: r for r in score_table(table, Picky(), ScoreOptions()).to_pylist()}
    assert {k: (r["reject_stage"], r["reject_reason"]) for k, r in out.items()} == {
        "ok_jpeg": (None, None), "cmyk": ("filter", "scoring_failed"), "rgba": (None, None)}
    assert "scorer exploded" in out["cmyk"]["reject_detail"]


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="filter.out_of_range"):
        SampleOptions(out_of_range="drop")
    with pytest.raises(ValueError, match="filter.min_aspect"):
        SampleOptions(min_aspect=5.0, max_aspect=4.0)
    with pytest.raises(ValueError, match="filter.decode_check"):
        SampleOptions(decode_check="maybe")


@pytest.mark.slow  # importing open_clip and building even a tiny CLIP takes ~10 s on the test machine
def test_real_scorer_fills_score_columns_and_thresholds_apply(raw_samples):
    from omegaconf import OmegaConf

    from stages.data.scorers import ImageTextScorer
    from tests.data.test_scorers import TINY_CLIP

    section = OmegaConf.create({"enabled": True, "arch": "test-tiny-clip", "pretrained": None,
                                "model_config": TINY_CLIP, "random_init_ok": True, "device": "cpu", "batch_size": 4,
                                "seed": 0})
    scorer = ImageTextScorer.from_config(section)
    good = process.process_unit([s for s in raw_samples if EXPECTED[s["key"]] == "kept"][:6], 0, SampleOptions())
    out = score_table(good, scorer, ScoreOptions(score_batch_size=4))
    assert out.column("reject_reason").null_count == 6
    assert out.column("clip_score").null_count == 0 and out.column("aesthetic_score").null_count == 0
    assert len(set(out.column("aesthetic_score").to_pylist())) > 1  # real, per-image values
    assert out.column("watermark_prob").null_count == 6  # no watermark head configured: null
    strict = score_table(good, scorer, ScoreOptions(min_clip_score=101.0))  # CLIPScore <= 100
    assert set(strict.column("reject_reason").to_pylist()) == {"low_clip_score"}
    assert filter_stage.build_scorer(OmegaConf.create({"enabled": False, "arch": "unused"})) is None
