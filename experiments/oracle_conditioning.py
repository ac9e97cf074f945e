"""Does the tiny base learn to use each word of a demo prompt when the text side is perfect?

The demo's base learns the background but places objects at chance (README, "About the demo"). This separates the
text encoders from the UNet: it trains the tiny base UNet in one process on the demo's 32-px latent cache (made by
``make demo``) with the frozen random text encoders replaced by an *oracle*, a one-hot code of the caption's object
colour, shape, cell, background and gradient in both the context tokens and the pooled vector. Then it reports

- how much of the latents' variance each attribute explains beyond the background (what a model could gain from it);
- conditioning use (stages/evaluate/conditioning_use.py) of the oracle-conditioned model on the cache's latents.

The step is the demo's (eps prediction, offset noise 0.5, text dropped to zeros at 0.15, AdamW lr 2e-3 with a cosine,
batch 64, EMA 0.99), so a word the oracle model ignores is not ignored for want of a clean text signal.

    python experiments/oracle_conditioning.py [--cache DIR | --synthetic N] [--steps 600] [--report-every N]
        [--snr-gamma 5] [--t-min T] [--coordinates]

``--coordinates`` tests why the cell is ignored: the UNet (a diagnostic variant, 6 input channels) also gets each
latent pixel's (x, y), which the SDXL UNet can otherwise only infer from its convolutions' zero padding.
``--synthetic N`` trains on N made-up 8x8 latents instead of the cache: a level set by the background word plus a
bright 2x2 patch in the caption's cell, nothing else (the easiest possible word-to-place mapping).
``--t-min T`` draws training timesteps from [T, 1000) only (the noise levels where the caption must set the layout).
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sdxl.conditioner import Conditioning, base_time_ids  # noqa: E402
from sdxl.diffusion import diffusion_loss  # noqa: E402
from sdxl.models import build_unet  # noqa: E402
from stages.data.demo_data import BACKGROUND_COLORS, OBJECT_COLORS, POSITION_PHRASES, SHAPES  # noqa: E402
from stages.evaluate.conditioning_use import ATTRIBUTES, conditioning_use  # noqa: E402
from stages.evaluate.prompt_following import COLS, ROWS, heldout_specs, spec_from_caption  # noqa: E402
from stages.train.task_components import sample_posterior  # noqa: E402

CONTEXT_DIM, POOLED_DIM = 96, 64  # the tiny base's cross-attention and pooled widths
_FIELDS = {"color": list(OBJECT_COLORS), "shape": list(SHAPES), "cell": list(POSITION_PHRASES),
           "background": list(BACKGROUND_COLORS)}


def oracle_encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled): token i+1 carries the one-hot of field i (at its own offset), the pooled vector all four."""
    context, pooled = torch.zeros(len(prompts), 77, CONTEXT_DIM), torch.zeros(len(prompts), POOLED_DIM)
    for row, prompt in enumerate(prompts):
        spec = spec_from_caption(prompt)
        values = {"color": spec.color, "shape": spec.shape, "cell": (spec.row, spec.col), "background": spec.background}
        offset = 0
        for token, (name, vocabulary) in enumerate(_FIELDS.items(), start=1):
            index = offset + vocabulary.index(values[name])
            context[row, token, index] = 1.0
            pooled[row, index] = 1.0
            offset += len(vocabulary)
        context[row, 5, offset] = float(spec.background_kind == "gradient")
    return context, pooled


def load_cache(folder: str, scale: float) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "*", "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no latent cache under {folder}: run `make demo` first (or pass --cache)")
    parts, captions = [load_file(f) for f in files], []
    for f in files:
        with safe_open(f, "pt") as handle:
            captions += json.loads(handle.metadata()["captions"])
    data = {k: torch.cat([p[k] for p in parts]).float()
            for k in ("latent_parameters", "original_size", "crop_coords", "target_size")}
    keep = [i for i, c in enumerate(captions) if spec_from_caption(c) is not None]
    data = {k: v[keep] for k, v in data.items()}
    data["captions"] = [captions[i] for i in keep]
    data["mean"] = data["latent_parameters"][:, :4] * scale
    return data


def synthetic_data(count: int, seed: int = 0, size: int = 8) -> dict:
    """``load_cache``'s dict for ``count`` made-up latents: the background word sets a level, the caption's cell holds
    a bright 2x2 patch, and nothing else varies (the posterior's std is ~0, so training sees exactly these latents)."""
    specs = heldout_specs(count, seed)
    latents = torch.zeros(count, 4, size, size)
    for i, spec in enumerate(specs):
        latents[i] += float(len(spec.background)) / 10
        row, col = ROWS.index(spec.row) * 3 * size // 8, COLS.index(spec.col) * 3 * size // 8
        latents[i, :, row:row + 2, col:col + 2] += 2.0
    return {"captions": [s.prompt for s in specs], "scale": 1.0, "mean": latents,
            "latent_parameters": torch.cat([latents, torch.full_like(latents, -30.0)], dim=1),
            "original_size": torch.full((count, 2), 4.0 * size), "crop_coords": torch.zeros(count, 2),
            "target_size": torch.full((count, 2), 4.0 * size)}


def explained_variance(latents: torch.Tensor, captions: list[str]) -> dict:
    """Residual variance of the latents after subtracting group means (background; background + one attribute)."""
    specs = [spec_from_caption(c) for c in captions]

    def residual(key) -> float:
        groups: dict = {}
        for i, spec in enumerate(specs):
            groups.setdefault(key(spec), []).append(i)
        rest = latents.clone()
        for index in groups.values():
            rest[index] -= latents[index].mean(0)
        return float((rest ** 2).mean())

    background = residual(lambda s: s.background)
    out = {"total": float(((latents - latents.mean(0)) ** 2).mean()), "after_background": background}
    for name, key in (("object_color", lambda s: (s.background, s.color)),
                      ("position", lambda s: (s.background, s.row, s.col))):
        out[f"explained_by_{name}"] = 1 - residual(key) / background
    return out


class WithCoordinates(torch.nn.Module):
    """A diagnostic, not an SDXL model: the UNet also sees each latent pixel's (x, y) in [-1, 1] as two channels."""

    def __init__(self, seed: int):
        super().__init__()
        from diffusers import UNet2DConditionModel

        from sdxl.presets import get_preset

        config = dict(get_preset("tiny").unet_base, in_channels=6)
        torch.manual_seed(seed)
        self.unet = UNet2DConditionModel(**config)

    def forward(self, sample, timestep, **kwargs):
        b, _, h, w = sample.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        coords = torch.stack([xs, ys]).to(sample).expand(b, 2, h, w)
        return self.unet(torch.cat([sample, coords], dim=1), timestep, **kwargs)


def train(data: dict, steps: int, snr_gamma: float | None, seed: int = 0, coordinates: bool = False,
          report_every: int = 0, report=None, t_min: int = 0) -> torch.nn.Module:
    """The demo's base step with the oracle text side; returns the EMA model. Every ``report_every`` steps (and
    never when 0) ``report(step, ema)`` runs, for a learning curve in one run."""
    unet = (WithCoordinates(seed) if coordinates else build_unet("tiny", "base", seed=seed)).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=1e-2)
    context, pooled = oracle_encode(data["captions"])
    generator = torch.Generator().manual_seed(seed)
    n, started = len(data["captions"]), time.time()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = max(lr, 1e-6)
        index = torch.randint(0, n, (64,), generator=generator)
        latents = sample_posterior(data["latent_parameters"][index], data["scale"], generator)
        drop = (torch.rand(64, generator=generator) < 0.15).view(-1, 1)
        cond = Conditioning(context[index] * ~drop.view(-1, 1, 1), pooled[index] * ~drop,
                            base_time_ids(data["original_size"][index], data["crop_coords"][index],
                                          data["target_size"][index], 64))
        loss, _ = diffusion_loss(unet, latents, cond, t_range=(t_min, 1000), offset_noise=0.5, generator=generator,
                                 snr_gamma=snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for averaged, live in zip(ema.parameters(), unet.parameters()):
                averaged.lerp_(live, 0.01)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {float(loss.detach()):.4f} ({time.time() - started:.0f} s)", flush=True)
        if report is not None and report_every > 0 and (step + 1) % report_every == 0 and step + 1 < steps:
            report(step + 1, ema)
    return ema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="outputs/data/default/latents/tiny-32-square")
    parser.add_argument("--vae", default="outputs/runs/train_vae/final/model", help="for its saved latent scale")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--snr-gamma", type=float, default=None)
    parser.add_argument("--images", type=int, default=256, help="images the conditioning use is measured on")
    parser.add_argument("--report-every", type=int, default=0,
                        help="also report conditioning use every this many steps (a learning curve in one run)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="train on N made-up latents (background level + a patch in the cell) instead of the cache")
    parser.add_argument("--t-min", type=int, default=0, help="draw training timesteps from [T, 1000) only")
    parser.add_argument("--coordinates", action="store_true",
                        help="diagnostic: give the UNet each pixel's position as two extra input channels")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.synthetic:
        data = synthetic_data(args.synthetic)
    else:
        with open(os.path.join(args.vae, "config.json")) as f:
            scale = float(json.load(f)["scaling_factor"])
        data = load_cache(args.cache, scale)
        data["scale"] = scale
    variance = explained_variance(data["mean"], data["captions"])
    print(f"{len(data['captions'])} cached latents; variance {variance['total']:.3f}, after the background "
          f"{variance['after_background']:.3f}, of which the object colour explains "
          f"{100 * variance['explained_by_object_color']:.1f}% and the cell "
          f"{100 * variance['explained_by_position']:.1f}%")
    count = min(args.images, len(data["captions"]))
    specs = [spec_from_caption(c) for c in data["captions"][:count]]
    time_ids = base_time_ids(data["original_size"][:count], data["crop_coords"][:count], data["target_size"][:count],
                             count)
    extra = (", coordinate channels" if args.coordinates else "") + (f", t >= {args.t_min}" if args.t_min else "")

    def report(step: int, model: torch.nn.Module) -> None:
        use = conditioning_use(model, oracle_encode, data["mean"][:count], specs, time_ids)
        print(f"conditioning use after {step} of {args.steps} steps (oracle text{extra}, {count} training images):")
        for attribute in ATTRIBUTES:
            print(f"  {attribute}: gain {100 * use[attribute]['gain']:+.1f}% (z {use[attribute]['z']:.1f})",
                  flush=True)

    model = train(data, args.steps, args.snr_gamma, coordinates=args.coordinates, report_every=args.report_every,
                  report=report, t_min=args.t_min)
    report(args.steps, model)


if __name__ == "__main__":
    main()
