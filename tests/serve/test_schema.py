"""Request validation for POST /generate (pure; no Ray, no models)."""

from __future__ import annotations

import os
import random

import pytest

from stages.serve.schema import (
    FIELDS,
    GenerateRequest,
    RequestDefaults,
    RequestError,
    ServeLimits,
    defaults_from_config,
    limits_from_config,
    parse_generate_request,
)

LIMITS = ServeLimits(max_side=2048, max_pixels=1024 * 1024, max_steps=50, max_images=4,
                     samplers=("euler", "ddim"))
DEFAULTS = RequestDefaults(width=512, height=512, steps=20)


def parse(body, rng=None) -> GenerateRequest:
    return parse_generate_request(body, LIMITS, DEFAULTS, rng=rng)


def field_of(body) -> str | None:
    with pytest.raises(RequestError) as err:
        parse(body)
    assert err.value.field is None or err.value.field in err.value.message
    assert 400 <= err.value.status < 500
    return err.value.field


def test_minimal_request_resolves_defaults():
    req = parse({"prompt": "a cat", "seed": 7})
    assert (req.width, req.height, req.steps, req.num_images, req.sampler, req.format) == (512, 512, 20, 1, "euler",
                                                                                           "png")
    assert req.original_size == (512, 512) and req.target_size == (512, 512) and req.crop_coords == (0, 0)
    assert req.refiner is False and req.seeds == [7] and not req.seed_was_random
    resolved = req.resolved()
    assert resolved["seed"] == 7 and resolved["refiner_strength"] is None and resolved["original_size"] == [512, 512]


def test_negative_prompt_absent_means_the_models_unconditional_input():
    """No (or a null) negative_prompt resolves to None — the model's unconditional input (zeros for the base, "" for
    the refiner); an explicit "" stays "" and is encoded, as in diffusers."""
    from omegaconf import OmegaConf

    assert parse({"prompt": "p"}).negative_prompt is None
    assert parse({"prompt": "p", "negative_prompt": None}).negative_prompt is None
    assert parse({"prompt": "p", "negative_prompt": ""}).negative_prompt == ""
    assert parse({"prompt": "p"}).resolved()["negative_prompt"] is None
    assert RequestDefaults().negative_prompt is None
    serve_defaults = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "conf", "serve",
                                                 "default.yaml")).request_defaults
    assert defaults_from_config(serve_defaults).negative_prompt is None


def test_non_square_size_and_micro_conditioning_are_kept():
    req = parse({"prompt": "p", "width": 768, "height": 256, "original_size": [300, 900], "crop_coords": [4, 8],
                 "target_size": [256, 768], "aesthetic_score": 7, "negative_aesthetic_score": 1.5})
    assert (req.height, req.width) == (256, 768)
    assert req.original_size == (300, 900) and req.crop_coords == (4, 8) and req.target_size == (256, 768)
    assert req.aesthetic_score == 7.0 and req.negative_aesthetic_score == 1.5


def test_missing_seed_is_drawn_and_reported():
    req = parse({"prompt": "p"}, rng=random.Random(3))
    again = parse({"prompt": "p"}, rng=random.Random(3))
    assert req.seed_was_random and req.seed == again.seed and 0 <= req.seed < 2**31
    assert parse({"prompt": "p", "num_images": 3, "seed": 10}).seeds == [10, 11, 12]


def test_refiner_modes():
    sdedit = parse({"prompt": "p", "refiner": True, "refiner_strength": 0.25})
    assert sdedit.refiner_mode == "sdedit" and sdedit.refiner_strength == 0.25 and sdedit.base_end_frac == 1.0
    ensemble = parse({"prompt": "p", "refiner": True, "high_noise_frac": 0.8})
    assert ensemble.refiner_mode == "ensemble" and ensemble.base_end_frac == 0.8
    assert ensemble.resolved()["refiner_strength"] is None
    default = parse({"prompt": "p", "refiner": True})
    assert default.refiner_strength == DEFAULTS.refiner_strength
    # The ensemble hand-off changes where the base stops, so such requests never share a base batch.
    assert ensemble.base_batch_key() != default.base_batch_key()


def test_batch_keys_group_compatible_requests():
    a = parse({"prompt": "a", "seed": 1})
    b = parse({"prompt": "something else", "negative_prompt": "n", "seed": 2})
    c = parse({"prompt": "a", "seed": 1, "width": 256})
    assert a.base_batch_key() == b.base_batch_key() != c.base_batch_key()
    assert a.decode_batch_key() == b.decode_batch_key() != c.decode_batch_key()


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "p", "negative_prompt": ["x"]}, "negative_prompt"),
        ({"prompt": "p", "width": 1001}, "width"),  # not a multiple of 8 (1000 is one: 125 x 8)
        ({"prompt": "p", "height": 1020}, "height"),
        ({"prompt": "p", "width": 100000}, "width"),
        ({"prompt": "p", "height": 0}, "height"),
        ({"prompt": "p", "width": "512"}, "width"),
        ({"prompt": "p", "width": 512.0}, "width"),
        ({"prompt": "p", "width": True}, "width"),
        ({"prompt": "p", "width": 2048, "height": 2048}, "width"),  # over the pixel budget
        ({"prompt": "p", "steps": 0}, "steps"),
        ({"prompt": "p", "steps": 10000}, "steps"),
        ({"prompt": "p", "num_images": 0}, "num_images"),
        ({"prompt": "p", "num_images": 1000}, "num_images"),
        ({"prompt": "p", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "p", "guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": "p", "guidance_scale": "high"}, "guidance_scale"),
        ({"prompt": "p", "seed": -1}, "seed"),
        ({"prompt": "p", "seed": 1.5}, "seed"),
        ({"prompt": "p", "sampler": "nope"}, "sampler"),
        ({"prompt": "p", "format": "gif"}, "format"),
        ({"prompt": "p", "refiner": "yes"}, "refiner"),
        ({"prompt": "p", "refiner_strength": 0}, "refiner_strength"),
        ({"prompt": "p", "refiner_strength": 1.5}, "refiner_strength"),
        ({"prompt": "p", "high_noise_frac": 1.0}, "high_noise_frac"),
        ({"prompt": "p", "refiner": True, "steps": 3, "refiner_strength": 0.3}, "refiner_strength"),
        ({"prompt": "p", "refiner_strength": 0.3, "high_noise_frac": 0.8}, "high_noise_frac"),
        ({"prompt": "p", "original_size": [512]}, "original_size"),
        ({"prompt": "p", "original_size": [0, 5]}, "original_size"),
        ({"prompt": "p", "crop_coords": [-1, 0]}, "crop_coords"),
        ({"prompt": "p", "target_size": "512x512"}, "target_size"),
        ({"prompt": "p", "aesthetic_score": 11}, "aesthetic_score"),
        ({"prompt": "p", "stepz": 5}, "stepz"),
    ],
)
def test_invalid_fields_are_named(body, field):
    assert field_of(body) == field


def test_body_must_be_an_object():
    with pytest.raises(RequestError) as err:
        parse(["prompt"])
    assert err.value.status == 400 and err.value.field is None


def test_every_field_is_accepted():
    body = {"prompt": "p", "negative_prompt": "n", "width": 256, "height": 512, "steps": 5, "guidance_scale": 0,
            "seed": 1, "num_images": 2, "refiner": True, "refiner_strength": 0.5, "original_size": [10, 20],
            "crop_coords": [0, 0], "target_size": [512, 256], "aesthetic_score": 5, "negative_aesthetic_score": 2,
            "sampler": "ddim", "format": "jpeg"}
    assert set(body) | {"high_noise_frac"} == set(FIELDS)
    req = parse(body)
    assert req.format == "jpeg" and req.guidance_scale == 0.0 and req.num_images == 2


def test_config_helpers():
    limits = limits_from_config({"max_side": 512, "max_steps": 8, "max_images": 2, "max_pixels": None},
                                samplers=("euler",), max_pixels=4096)
    assert limits.max_pixels == 4096 and limits.max_side == 512
    assert defaults_from_config({"width": 64, "height": 64}).width == 64
    with pytest.raises(ValueError, match="widht"):
        defaults_from_config({"widht": 64})
    with pytest.raises(ValueError, match="max_side"):
        ServeLimits(max_side=0)
