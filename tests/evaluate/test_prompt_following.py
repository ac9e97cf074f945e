"""The known-answer prompt-following reader: it reads real demo images correctly and nothing else scores by luck."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from stages.data import demo_data as dd
from stages.evaluate.prompt_following import (CHANCE, DARK_BACKGROUNDS, LIGHT_BACKGROUNDS, PromptSpec, Reading,
                                              heldout_specs, labelled_grid, lightness_auc, object_mask, read_image,
                                              score, spec_from_caption, spec_from_params)


def _demo_image(index: int, side: int = 64, seed: int = 11) -> tuple[Image.Image, dict]:
    params = dd.sample_params(np.random.default_rng([seed, index]), index, seed, max_side=512)
    image = dd.render(params)
    factor = side / min(image.size)
    size = (max(8, round(image.size[0] * factor)), max(8, round(image.size[1] * factor)))
    return image.resize(size, Image.Resampling.BICUBIC), params


def test_reader_reads_real_demo_images_at_training_size():
    pairs = [_demo_image(i) for i in range(120)]
    result = score([read_image(im) for im, _ in pairs], [spec_from_params(p) for _, p in pairs])
    assert result["object_color_accuracy"] == 1.0
    assert result["background_accuracy"] == 1.0
    assert result["position_accuracy"] >= 0.98
    assert result["shape_accuracy"] >= 0.98  # 1.0 on 300 such images; 0.96 at 32 px (a circle's few pixels)
    assert result["background_lightness_auc"] == 1.0
    assert result["num_images"] == 120


def test_reader_finds_no_object_on_a_plain_background():
    image = Image.new("RGB", (64, 64), dd.BACKGROUND_COLORS["beige"])
    reading = read_image(image)
    assert reading.background == "beige"
    assert reading.object_color is None and reading.row is None


def test_object_mask_finds_the_object_whatever_its_colour():
    """The object's pixels (the crop-conditioning measure of experiments/paper_effects.py): its centroid is the
    generator's centre, in whichever colour the object is drawn; a plain background has none."""
    for i in range(40):
        image, params = _demo_image(i)
        ys, xs = np.nonzero(object_mask(image))
        h, w = image.size[1], image.size[0]
        if params["shape"] not in ("triangle", "star"):  # their centroid is not their box centre
            assert abs((xs.mean() + 0.5) / w - params["cx"]) < 0.04 and abs((ys.mean() + 0.5) / h - params["cy"]) < 0.04
        recoloured = np.asarray(image).copy()
        recoloured[object_mask(image)] = (90, 200, 90)  # not one of the object colours
        assert (object_mask(recoloured) == object_mask(image)).mean() > 0.99
    assert object_mask(Image.new("RGB", (64, 64), dd.BACKGROUND_COLORS["blue"])) is None


def test_reader_sees_a_moved_object_in_its_new_cell():
    params = {**_demo_image(3)[1], "cx": 0.85, "cy": 0.15, "size": 0.2, "orig_h": 96, "orig_w": 96, "render_scale": 1}
    reading = read_image(dd.render(params))
    assert (reading.row, reading.col) == ("top", "right")


def test_caption_round_trip_and_other_text():
    for spec in heldout_specs(60, seed=4):
        assert spec_from_caption(spec.prompt) == spec
    assert spec_from_caption("a photograph of an astronaut riding a horse") is None
    assert spec_from_caption("a white triangle in the bottom right on a purple background") is None  # not the vocab


def test_demo_captions_parse_to_their_parameters():
    for i in range(50):
        _, params = _demo_image(i)
        assert spec_from_caption(dd.caption_for(params)) == spec_from_params(params)


def test_heldout_specs_exclude_training_captions_and_balance_cells():
    first = heldout_specs(90, seed=0)
    excluded = {s.prompt for s in first[:45]}
    specs = heldout_specs(90, seed=0, exclude_prompts=excluded)
    assert not excluded & {s.prompt for s in specs}
    cells = [(s.row, s.col) for s in specs]
    assert all(cells.count(c) == 10 for c in set(cells)) and len(set(cells)) == 9


def test_score_against_wrong_prompts_is_near_chance():
    pairs = [_demo_image(i, seed=2) for i in range(150)]
    readings = [read_image(im) for im, _ in pairs]
    shuffled = [spec_from_params(p) for _, p in pairs]
    shuffled = shuffled[7:] + shuffled[:7]
    result = score(readings, shuffled)
    for name in ("object_color", "background", "position", "shape"):
        assert result[f"{name}_accuracy"] < CHANCE[name] + 0.15
    assert abs(result["background_lightness_auc"] - 0.5) < 0.15


def test_lightness_auc_counts_light_over_dark_pairs_and_ties_half():
    spec = PromptSpec("red", "circle", "white", "plain", "top", "left")

    def pair(background: str, lightness: float):
        return Reading(background, None, None, None, 0.0, lightness), replace(spec, background=background)

    # light prompts drawn at 200 and 90; dark ones at 100 and 90: 200 beats both, 90 loses one and ties one
    pairs = [pair("white", 200.0), pair("beige", 90.0), pair("black", 100.0), pair("blue", 90.0),
             pair("gray", 0.0)]  # gray is neither light nor dark
    assert lightness_auc(pairs) == pytest.approx((2 + 0 + 0.5) / 4)
    assert lightness_auc(pairs[:2]) is None  # no dark prompt
    assert set(LIGHT_BACKGROUNDS) == {"white", "beige"} and set(DARK_BACKGROUNDS) == {"black", "blue", "brown"}


def test_score_refuses_mismatched_lengths():
    with pytest.raises(ValueError):
        score([read_image(_demo_image(0)[0])], [])


def test_labelled_grid_has_a_tile_per_image():
    pairs = [_demo_image(i) for i in range(10)]
    specs = [spec_from_params(p) for _, p in pairs]
    grid = labelled_grid([im for im, _ in pairs], specs, [read_image(im) for im, _ in pairs], columns=5, tile=64)
    assert grid.size == (5 * 64, 2 * (64 + 30))
    assert isinstance(specs[0], PromptSpec)


def test_the_generate_stage_asks_for_the_demo_vocabulary():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "pipeline" / "conf" / "generate" / "default.yaml"
    prompts = list(OmegaConf.load(conf).prompts)
    assert len(prompts) >= 4
    assert [p for p in prompts if spec_from_caption(p) is None] == []  # every prompt is a demo caption
