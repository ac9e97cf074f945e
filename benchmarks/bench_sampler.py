"""Our base sampler (``sdxl.sampling.sample_base``) against diffusers' ``StableDiffusionXLPipeline``.

Same tiny random UNet, embeddings, micro-conditioning, scheduler config, steps, guidance and seed on both sides
(the outputs agree to 1e-4: tests/sdxl/test_sampling_agreement.py); the pipeline gets the embeddings directly and
returns latents, so both sides time the denoising loop only. Runs alternate between the two sides (so a load change
on a shared machine hits both alike), each side going first in every other pair, and each side reports its median.
One torch thread, as a serving replica gets.
``ratio`` is the total of our medians over diffusers' across the three samplers (per-sampler ratios are listed
too; they are noisier on a loaded machine). Goal: ratio ≤ 1.05.

Run: ``python benchmarks/bench_sampler.py`` (prints the numbers; ``main()`` returns them).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

HEIGHT = WIDTH = 128
STEPS = 20
GUIDANCE = 5.0
REPEATS = 5
SEED = 0
GOAL_RATIO = 1.05


def _components():
    from sdxl.conditioner import Conditioning
    from sdxl.models import build_unet, build_vae
    from sdxl.presets import get_preset

    preset = get_preset("tiny")
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 77, preset.context_dim_base, generator=g)
    pooled = torch.randn(2, preset.pooled_dim, generator=g)
    ids = torch.tensor([[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]], dtype=torch.float32)
    return {
        "unet": build_unet(preset, "base").eval(),
        "vae": build_vae(preset).eval(),
        "cond": Conditioning(ctx[:1], pooled[:1], ids),
        "uncond": Conditioning(ctx[1:], pooled[1:], ids),
    }


def _ours(parts, sampler: str):
    from sdxl.latent_scale import vae_downsample
    from sdxl.sampling import SampleParams, sample_base

    params = SampleParams(height=HEIGHT, width=WIDTH, steps=STEPS, guidance_scale=GUIDANCE, sampler=sampler,
                          seed=SEED, latent_downsample=vae_downsample(parts["vae"]))
    return lambda: sample_base(parts["unet"], parts["cond"], parts["uncond"], params)


def _diffusers(parts, sampler: str):
    from diffusers import StableDiffusionXLPipeline

    from sdxl.sampling import make_scheduler

    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=parts["unet"], scheduler=make_scheduler(sampler))
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = parts["cond"], parts["uncond"]

    def run():
        return pipe(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled,
                    negative_prompt_embeds=uncond.context, negative_pooled_prompt_embeds=uncond.pooled,
                    height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(SEED), output_type="latent").images

    return run


def _timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return time.perf_counter() - start, out


def main() -> dict:
    from sdxl.sampling import SAMPLERS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = _components()
        result = {"name": "sampler", "setup": f"tiny preset base UNet, {HEIGHT}x{WIDTH} px, {STEPS} steps, "
                                              f"cfg {GUIDANCE}, batch 1, CPU, 1 thread, median of {REPEATS}"}
        totals = {"ours": 0.0, "diffusers": 0.0}
        for sampler in SAMPLERS:
            ours, theirs = _ours(parts, sampler), _diffusers(parts, sampler)
            _timed(ours), _timed(theirs)  # warm-up: first calls allocate and initialise lazily
            ours_s, theirs_s, max_diff = [], [], 0.0
            for repeat in range(REPEATS):
                # Each side goes first every other repeat: the first of a pair can pay for the other's cache misses.
                if repeat % 2 == 0:
                    (t_ours, a), (t_theirs, b) = _timed(ours), _timed(theirs)
                else:
                    (t_theirs, b), (t_ours, a) = _timed(theirs), _timed(ours)
                ours_s.append(t_ours)
                theirs_s.append(t_theirs)
                max_diff = max(max_diff, (a - b).abs().max().item())
            ratio = statistics.median(ours_s) / statistics.median(theirs_s)
            totals["ours"] += statistics.median(ours_s)
            totals["diffusers"] += statistics.median(theirs_s)
            result[f"{sampler}_ours_s"] = statistics.median(ours_s)
            result[f"{sampler}_diffusers_s"] = statistics.median(theirs_s)
            result[f"{sampler}_ratio"] = ratio
            result[f"{sampler}_max_abs_diff"] = max_diff
            print(f"{sampler}: ours {statistics.median(ours_s):.3f} s, diffusers {statistics.median(theirs_s):.3f} s,"
                  f" ratio {ratio:.3f}, max |diff| {max_diff:.2e}", flush=True)
        result["ratio"] = totals["ours"] / totals["diffusers"]
        result["goal_ratio"] = GOAL_RATIO
        result["meets_goal"] = result["ratio"] <= GOAL_RATIO
        print(f"sampler: ours/diffusers over all samplers {result['ratio']:.3f} (goal <= {GOAL_RATIO})")
        return result
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
