"""Conditioning use (stages/evaluate/conditioning_use.py) on denoisers whose use of each word is known."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sdxl.diffusion import default_schedule
from pipeline.tracking import stage_run
from stages.data.demo_data import BACKGROUND_COLORS
from stages.evaluate.conditioning_use import ATTRIBUTES, conditioning_use, swapped
from stages.evaluate.prompt_following import heldout_specs, spec_from_caption

BACKGROUNDS = list(BACKGROUND_COLORS)


def _encode_background(prompts):
    """Context whose first token is the background's one-hot; everything else about the prompt is dropped."""
    context = torch.zeros(len(prompts), 77, 8)
    for i, prompt in enumerate(prompts):
        context[i, 0, BACKGROUNDS.index(spec_from_caption(prompt).background)] = 1.0
    return context, torch.zeros(len(prompts), 4)


class BackgroundOracle(torch.nn.Module):
    """Predicts the noise as if the clean latent were its background's constant: uses the background word only."""

    def __init__(self, levels: torch.Tensor, use_text: bool = True):
        super().__init__()
        self.levels = levels
        self.use_text = use_text
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a parameter, so the measure can read the dtype
        self.alphas = default_schedule().alphas_cumprod

    def forward(self, noisy, t, encoder_hidden_states, added_cond_kwargs, return_dict=False):
        index = encoder_hidden_states[:, 0, :len(BACKGROUNDS)].argmax(1)
        guess = self.levels[index] if self.use_text else self.levels.mean().expand(len(t))
        a = self.alphas[t].view(-1, 1, 1, 1)
        eps = (noisy - a.sqrt() * guess.view(-1, 1, 1, 1)) / (1 - a).sqrt()
        return (eps,)


def _images(n: int = 40, seed: int = 0):
    specs = heldout_specs(n, seed)
    levels = torch.linspace(-1.0, 1.0, len(BACKGROUNDS))
    rng = torch.Generator().manual_seed(seed)
    latents = torch.stack([levels[BACKGROUNDS.index(s.background)] + 0.1 * torch.randn(4, 4, 4, generator=rng)
                           for s in specs])
    return specs, levels, latents, torch.zeros(n, 6)


def test_a_denoiser_that_reads_the_background_word_gains_on_it_alone():
    specs, levels, latents, time_ids = _images()
    use = conditioning_use(BackgroundOracle(levels), _encode_background, latents, specs, time_ids, batch_size=16)
    assert use["num_images"] == 40 and use["background"]["gain"] > 1.0 and use["background"]["z"] > 3
    # a wrong colour or cell leaves the background word, so this denoiser's error is exactly unchanged
    assert use["object_color"]["gain"] == 0.0 and use["position"]["gain"] == 0.0 and use["shape"]["gain"] == 0.0
    assert set(use["background"]["gain_per_timestep"]) == {300, 500, 700, 900}


def test_a_denoiser_that_ignores_text_gains_nothing():
    specs, levels, latents, time_ids = _images()
    use = conditioning_use(BackgroundOracle(levels, use_text=False), _encode_background, latents, specs, time_ids)
    assert use["x0_mse_true"] > 0
    assert all(use[a]["gain"] == 0.0 and use[a]["z"] == 0.0 for a in ATTRIBUTES)


def test_the_measure_does_not_depend_on_batching():
    specs, levels, latents, time_ids = _images(24)
    one = conditioning_use(BackgroundOracle(levels), _encode_background, latents, specs, time_ids, batch_size=5)
    other = conditioning_use(BackgroundOracle(levels), _encode_background, latents, specs, time_ids, batch_size=24)
    assert one["background"]["gain"] == pytest.approx(other["background"]["gain"], rel=1e-5)


def test_swapped_changes_exactly_one_attribute():
    rng = np.random.default_rng(0)
    for spec in heldout_specs(30, 1):
        for attribute in ATTRIBUTES:
            other = swapped(spec, attribute, rng)
            changed = {name for name in ("color", "shape", "background", "background_kind", "row", "col")
                       if getattr(other, name) != getattr(spec, name)}
            expected = {"background": {"background"}, "object_color": {"color"}, "shape": {"shape"}}.get(attribute)
            assert changed == expected if expected else (changed and changed <= {"row", "col"})
            assert spec_from_caption(other.prompt) == other  # still a caption of the demo vocabulary


def test_bad_inputs_are_named():
    specs, levels, latents, time_ids = _images(4)
    with pytest.raises(ValueError, match=">= 2"):
        conditioning_use(BackgroundOracle(levels), _encode_background, latents[:1], specs[:1], time_ids[:1])
    with pytest.raises(ValueError, match="timesteps"):
        conditioning_use(BackgroundOracle(levels), _encode_background, latents, specs, time_ids, timesteps=(1000,))
    with pytest.raises(ValueError, match="attribute"):
        swapped(specs[0], "size", np.random.default_rng(0))


@pytest.mark.slow  # a tiny random UNet samples 9 prompts and denoises 8 held-out images 16 times: ~20 s
def test_the_prompt_following_stage_reports_conditioning_use_and_logs_it(tmp_path):
    import mlflow

    from sdxl.models import build_unet
    from stages.evaluate import stage
    from tests.evaluate import eval_config, stage_context, write_dataset

    root = str(tmp_path / "root")
    write_dataset(os.path.join(root, "data", "default"), n=24, size=40)  # its last image does not decode
    ema = os.path.join(root, "runs", "pretrain256", "final", "ema")
    build_unet("tiny", "base", seed=7).save_pretrained(ema, safe_serialization=True)
    cfg = eval_config(root, kind="prompt_following", checkpoint=ema, resolution=32, steps=2, val_fraction=0.5,
                      device="cpu", prompt_following={"num_prompts": 9, "use_images": 8, "batch_size": 4})
    make_ctx = stage_context(cfg)
    with stage_run(cfg, "evaluate") as tracker:
        summary = stage.run(cfg, make_ctx(tracker))["prompt_following"]
    use = summary["conditioning_use"]
    assert use["num_images"] == 8 and use["timesteps"] == [300, 500, 700, 900] and use["x0_mse_true"] > 0
    for attribute in ATTRIBUTES:
        assert np.isfinite(use[attribute]["gain"]) and np.isfinite(use[attribute]["z"])
    logged = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri).get_run(tracker.run_id).data.metrics
    assert logged["conditioning_use_background_gain"] == pytest.approx(use["background"]["gain"])
    assert logged["conditioning_use_shape_z"] == pytest.approx(use["shape"]["z"])
    assert logged["prompt_following_background_accuracy"] == pytest.approx(summary["background_accuracy"])
    assert logged["prompt_following_shape_accuracy"] == pytest.approx(summary["shape_accuracy"])
    assert os.path.isfile(os.path.join(summary["output_dir"], "prompt_following.json"))
