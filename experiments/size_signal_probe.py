"""Does an autoencoder keep the size signal that c_size needs? Small vs large originals, told apart from pixels,
from its latents and from its reconstructions.

    python experiments/size_signal_probe.py probe VAE_FOLDER [--images DIR] [--resolution 32]
    python experiments/size_signal_probe.py train OUT --levels 3 --latent-channels 4 [--steps 2000] [--images DIR]

``probe``: the paper-effects data's images (``--images``: a `stage=demo_data` folder with the generator's JSON, by
default the chain's ``outputs/paper_effects/demo_images``) are centre-cropped at ``--resolution`` as Alg. 1 does;
each crop, its latent means and its reconstruction get the same sharpness features (log energy of horizontal and
vertical differences and of the Laplacian, log std; per channel), and a logistic regression, cross-validated 5-fold,
says how often they tell an original with a shorter side below the resolution (up-sampled, blurry) from a larger one
(down-sampled, sharp). Printed beside the majority class: an accuracy at the majority rate means the signal is gone,
and no c_size can steer what the latents do not hold. Also the large/small ratio of the reconstructions' Laplacian
variance (the data's own ratio beside it) and the PSNR.

``train``: latent shapes the presets cannot express (another number of levels or latent channels) need a model the
stages do not build, so this trains one in a plain loop with the paper-effects chain's autoencoder recipe (pixel L2 +
1e-6 KL, posterior log-variance bias -8, AdamW 2e-3 (``--lr``) with 20 warm-up steps, batch 16, widths 16/32/32/.., one layer per
block, on centre crops) and saves it for ``probe``. A diagnostic, not a stage: its figures are not the pipeline's,
and ``--levels 3 --latent-channels 4`` checks that the loop matches the chain's own autoencoder
(docs/decisions.md, 2026-12-04, night).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_IMAGES = os.path.join(REPO, "outputs", "paper_effects", "demo_images")


def centre_crops(folder: str, resolution: int, limit: int = 1000) -> tuple[torch.Tensor, np.ndarray]:
    """[N, 3, r, r] crops in [-1, 1] and 1 where the original's shorter side is at least ``resolution``."""
    from experiments.effects_models import _training_images
    from sdxl.crops import bucket_crop_resize
    from stages.train.data_loader import pil_to_tensor

    images, sizes, _ = _training_images(folder, limit)
    if not images:
        raise FileNotFoundError(f"no generated images with their JSON under {folder}")
    crops = [pil_to_tensor(bucket_crop_resize(image, (resolution, resolution), mode="center")[0])[None]
             for image in images]
    return torch.cat(crops), np.array([int(min(h, w) >= resolution) for h, w in sizes])


def sharpness_features(t: torch.Tensor) -> np.ndarray:
    """Per channel of one [C, H, W] tensor: log energy of its x and y differences and its Laplacian, log std."""
    dx = (t[:, :, 1:] - t[:, :, :-1]).pow(2).mean((1, 2))
    dy = (t[:, 1:] - t[:, :-1]).pow(2).mean((1, 2))
    lap = (4 * t[:, 1:-1, 1:-1] - t[:, :-2, 1:-1] - t[:, 2:, 1:-1] - t[:, 1:-1, :-2] - t[:, 1:-1, 2:]).pow(2).mean((1, 2))
    return torch.cat([(v + 1e-8).log() for v in (dx, dy, lap, t.std((1, 2)))]).numpy()


def separability(features: list[np.ndarray], labels: np.ndarray) -> tuple[float, float]:
    """Mean and std of 5-fold cross-validated logistic-regression accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_score(model, np.stack(features), labels, cv=5, scoring="accuracy")
    return float(scores.mean()), float(scores.std())


def probe(vae_folder: str, images: str, resolution: int) -> dict:
    from diffusers import AutoencoderKL

    from stages.evaluate.measures import laplacian_variance

    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    crops, large = centre_crops(images, resolution)
    features = {"pixels": [], "latents": [], "reconstructions": []}
    lap = {"real": [], "recon": []}
    squared_error = []
    with torch.no_grad():
        for x in crops.split(50):
            latents = vae.encode(x).latent_dist.mean
            recon = vae.decode(latents).sample.clamp(-1, 1)
            squared_error += (recon - x).pow(2).mean((1, 2, 3)).tolist()
            for i in range(len(x)):
                features["pixels"].append(sharpness_features(x[i]))
                features["latents"].append(sharpness_features(latents[i]))
                features["reconstructions"].append(sharpness_features(recon[i]))
                for key, image in (("real", x[i]), ("recon", recon[i])):
                    lap[key].append(laplacian_variance(((image.permute(1, 2, 0).numpy() / 2 + 0.5) * 255)
                                                       .round().clip(0, 255).astype(np.uint8)))
    result = {"images": len(large), "majority": float(max(large.mean(), 1 - large.mean())),
              "psnr": float(np.mean([10 * np.log10(4.0 / max(e, 1e-10)) for e in squared_error]))}
    for key, values in features.items():
        result[f"accuracy_{key}"] = separability(values, large)
    for key, values in lap.items():
        values = np.array(values)
        result[f"laplacian_large_over_small_{key}"] = float(values[large == 1].mean() / values[large == 0].mean())
    return result


def train(out: str, levels: int, latent_channels: int, steps: int, images: str, resolution: int,
          lr: float = 2e-3) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
                        up_block_types=["UpDecoderBlock2D"] * levels,
                        block_out_channels=([16, 32] + [32] * levels)[:levels], layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=resolution)
    with torch.no_grad():
        vae.quant_conv.bias[latent_channels:] = -8.0  # the posterior's log-variance starts small (the chain's -8)
    crops, _ = centre_crops(images, resolution)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    started = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        x = crops[torch.randint(0, len(crops), (16,))]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean + posterior.std * torch.randn_like(posterior.mean)).sample
        logvar = posterior.logvar.clamp(-30, 20)
        kl = 0.5 * (posterior.mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean() / x[0].numel()
        loss = (recon - x).pow(2).mean() + 1e-6 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.5f} ({time.time() - started:.0f} s)", flush=True)
    vae.eval().save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("vae_folder")
    t = sub.add_parser("train")
    t.add_argument("out")
    t.add_argument("--levels", type=int, default=3)
    t.add_argument("--latent-channels", type=int, default=4)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--lr", type=float, default=2e-3)
    for sp in (p, t):
        sp.add_argument("--images", default=DEFAULT_IMAGES)
        sp.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    if args.command == "train":
        train(args.out, args.levels, args.latent_channels, args.steps, args.images, args.resolution, args.lr)
        args.vae_folder = args.out
    result = probe(args.vae_folder, args.images, args.resolution)
    print(f"{result['images']} images, majority class {result['majority']:.3f}; PSNR {result['psnr']:.2f} dB")
    for key in ("pixels", "latents", "reconstructions"):
        mean, std = result[f"accuracy_{key}"]
        print(f"small vs large from {key:15s} {mean:.3f} ± {std:.3f}")
    print(f"Laplacian variance large/small: data {result['laplacian_large_over_small_real']:.2f}, "
          f"reconstructions {result['laplacian_large_over_small_recon']:.2f}")


if __name__ == "__main__":
    main()
