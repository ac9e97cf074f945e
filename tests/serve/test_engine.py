"""The text-encoding core of the server: each request's negative side is the model's unconditional input unless it
gives a negative prompt (SPEC, "Classifier-free guidance"), whoever shares its batch."""

from __future__ import annotations

import json

import pytest
import torch

from stages.serve.engine import TextEncoderCore
from stages.serve.loading import ModelSources, load_text_conditioners, recorded_unconditional_kind
from stages.serve.schema import RequestDefaults, ServeLimits, parse_generate_request


@pytest.fixture(scope="module")
def conditioners():
    return load_text_conditioners(ModelSources(preset="tiny", seed=0))


def _request(**body):
    return parse_generate_request({"prompt": "a red circle", "seed": 1, "refiner": True, **body},
                                  ServeLimits(samplers=("euler",)), RequestDefaults(width=64, height=64, steps=4))


def test_each_request_gets_its_own_unconditional_side_in_a_shared_batch(conditioners):
    base, refiner = conditioners
    encoded = TextEncoderCore(base, refiner).encode([_request(), _request(negative_prompt=""),
                                                    _request(negative_prompt="blurry")])
    empty_base, empty_refiner = base.encode("")[0], refiner.encode("")[0]
    # no negative prompt: zeros for the base (its training dropout), the encoding of "" for the refiner
    assert torch.count_nonzero(encoded[0].base_uncond.context) == 0
    assert torch.count_nonzero(encoded[0].base_uncond.pooled) == 0
    assert torch.allclose(encoded[0].refiner_uncond.context, empty_refiner, atol=1e-5)
    # an explicit "" is encoded for both, as diffusers does
    assert torch.allclose(encoded[1].base_uncond.context, empty_base, atol=1e-5)
    assert torch.allclose(encoded[1].refiner_uncond.context, empty_refiner, atol=1e-5)
    assert torch.allclose(encoded[2].base_uncond.context, base.encode("blurry")[0], atol=1e-5)


def test_served_conditioners_follow_what_the_weights_record(tmp_path):
    assert recorded_unconditional_kind(None, "base") == "zeros"
    assert recorded_unconditional_kind(None, "refiner") == "empty_prompt"
    final = tmp_path / "final"
    (final / "ema").mkdir(parents=True)
    (final / "info.json").write_text(json.dumps({"lineage": {"unconditional": "empty_prompt"}}))
    assert recorded_unconditional_kind(str(final), "base") == "empty_prompt"
    assert recorded_unconditional_kind(str(final / "ema"), "base") == "empty_prompt"
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": False}))
    assert recorded_unconditional_kind(str(pipeline), "base") == "empty_prompt"
    (final / "info.json").write_text(json.dumps({"lineage": {"unconditional": "ones"}}))
    with pytest.raises(ValueError, match="unconditional"):
        recorded_unconditional_kind(str(final), "base")
    base, refiner = load_text_conditioners(ModelSources(preset="tiny", root=str(tmp_path), base="pipeline"))
    assert base.unconditional_kind == "empty_prompt" and refiner.unconditional_kind == "empty_prompt"
