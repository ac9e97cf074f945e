"""experiments/oracle_conditioning.py: the oracle text code, the variance split, and a 2-step run of each UNet."""

from __future__ import annotations

import pytest
import torch

from experiments.oracle_conditioning import explained_variance, oracle_encode, synthetic_data, train
from stages.evaluate.conditioning_use import ATTRIBUTES, conditioning_use
from stages.evaluate.prompt_following import COLS, ROWS, heldout_specs, spec_from_caption


def test_the_oracle_code_tells_every_attribute_apart():
    specs = heldout_specs(40, 0)
    context, pooled = oracle_encode([s.prompt for s in specs])
    assert context.shape == (40, 77, 96) and pooled.shape == (40, 64)
    for i, a in enumerate(specs):
        for j, b in enumerate(specs):
            if (a.color, a.shape, a.row, a.col, a.background, a.background_kind) != (
                    b.color, b.shape, b.row, b.col, b.background, b.background_kind):
                assert not torch.equal(context[i], context[j])
    # the code's tokens 1-5 are one-hots (the gradient flag may be 0); the rest of the context is empty
    assert context[:, 1:5].sum(-1).eq(1).all() and context[:, 6:].abs().sum() == 0


def test_the_variance_split_finds_what_the_latents_depend_on():
    data = synthetic_data(420, 1)
    split = explained_variance(data["mean"], data["captions"])
    assert split["explained_by_position"] > 0.95
    assert split["explained_by_object_color"] < 0.25  # only the chance grouping of 420 images into 42 groups


@pytest.mark.parametrize("coordinates, t_min", [(False, 0), (True, 600)], ids=["sdxl_unet", "with_coordinates"])
def test_two_training_steps_then_the_measure(coordinates, t_min):
    data = synthetic_data(8, 2)
    specs = [spec_from_caption(c) for c in data["captions"]]
    reported = []
    model = train(data, steps=2, snr_gamma=None, coordinates=coordinates, report_every=1, t_min=t_min,
                  report=lambda step, ema: reported.append((step, ema.training)))
    assert reported == [(1, False)]  # the learning-curve hook sees the EMA model mid-run; the last step is the caller's
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(8, 1)
    use = conditioning_use(model, oracle_encode, data["mean"], specs, time_ids, timesteps=(500,))
    assert all(torch.isfinite(torch.tensor(use[a]["gain"])) for a in ATTRIBUTES)


def test_synthetic_latents_hold_the_patch_in_the_captions_cell():
    data = synthetic_data(30, 3)
    for latent, caption in zip(data["mean"], data["captions"]):
        spec = spec_from_caption(caption)
        row, col = ROWS.index(spec.row) * 3, COLS.index(spec.col) * 3
        bright = latent[0] > latent[0].min() + 1.0
        assert bright.sum() == 4 and bright[row:row + 2, col:col + 2].all()
    assert torch.equal(data["latent_parameters"][:, :4], data["mean"])
