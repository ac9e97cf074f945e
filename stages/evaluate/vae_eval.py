"""``evaluate.kind=vae``: reconstruction quality of the autoencoder on held-out images, as SDXL Table 3 reports it —
PSNR, SSIM, LPIPS (when trunk weights are supplied, ``evaluate.lpips_weights``) and rFID (FID between the held-out
images and their reconstructions, with the ``evaluate.fid_weights`` network).

On demo data (held-out captions in the demo vocabulary) it also reports the *read-back*: how often the
prompt-following reader reads the same object colour, background and 3×3 cell from a reconstruction as from its
original. The base model only ever sees the autoencoder's latents, so these are ceilings on its prompt-following
scores (a hue the decoder shifts cannot come out right however well the base learns).

The autoencoder is ``<root>/runs/train_vae/final/ema`` (or ``evaluate.checkpoint``), else the VAE the diffusion stages
use (``model.pretrained``'s, or the preset's random init when ``evaluate.allow_random=true``). Reconstructions decode
the posterior mean, the deterministic path.
"""

from __future__ import annotations

import json
import logging

import torch
from omegaconf import DictConfig

from pipeline.context import StageContext
from stages.evaluate import metrics
from stages.evaluate.measures import laplacian_variance

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("psnr", "ssim", "lpips", "rfid", "sharpness_kept", "num_images")
READBACK_KEYS = ("object_color", "background", "position", "shape")  # what the demo reader reads back


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Posterior-mean reconstructions [N, 3, H, W] in [0, 1] of ``images`` (float in [0, 1] or uint8)."""
    device = next(vae.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        pixels = (batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()) * 2 - 1
        latents = vae.encode(pixels.to(device=device, dtype=torch.float32)).latent_dist.mean
        decoded = vae.decode(latents).sample.float()
        out.append((decoded / 2 + 0.5).clamp(0, 1).cpu())
    return torch.cat(out)


class ReconstructionScores:
    """Accumulates PSNR, SSIM, LPIPS (with a model) per image, rFID features and each image's sharpness (variance of
    the Laplacian) over batches of (original, reconstruction) pairs in [0, 1], so a paper-size held-out set never
    sits in memory at once. ``sharpness_kept`` = the reconstructions' mean Laplacian variance over the originals':
    1.0 keeps the detail, an MSE-trained autoencoder that softens every edge scores well below (docs/results.md:
    the size signal SDXL's c_size carries lives in that detail)."""

    def __init__(self, feature_net, lpips_model=None):
        self.feature_net, self.lpips_model = feature_net, lpips_model
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("psnr", "ssim", "lpips", "real", "fake",
                                                                     "sharp_real", "sharp_fake")}

    def add(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        from stages.evaluate.features import image_features

        originals = originals.float() / 255.0 if originals.dtype == torch.uint8 else originals.float()
        self.parts["psnr"].append(metrics.psnr_values(reconstructions, originals))
        self.parts["ssim"].append(metrics.ssim_values(reconstructions, originals))
        if self.lpips_model is not None:
            self.parts["lpips"].append(metrics.lpips_values(self.lpips_model, reconstructions, originals))
        self.parts["real"].append(image_features(self.feature_net, originals)["pool"])
        self.parts["fake"].append(image_features(self.feature_net, reconstructions)["pool"])
        for key, images in (("sharp_real", originals), ("sharp_fake", reconstructions)):
            as_u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            self.parts[key].append(torch.tensor([laplacian_variance(img) for img in as_u8], dtype=torch.float64))

    @property
    def count(self) -> int:
        return sum(len(p) for p in self.parts["real"])

    def result(self) -> dict:
        if not self.parts["psnr"]:
            raise ValueError("no reconstructions to score")
        mean = {k: float(torch.cat(self.parts[k]).mean()) if self.parts[k] else None
                for k in ("psnr", "ssim", "lpips")}
        real, fake = torch.cat(self.parts["real"]), torch.cat(self.parts["fake"])
        sharp_real = float(torch.cat(self.parts["sharp_real"]).mean())
        kept = float(torch.cat(self.parts["sharp_fake"]).mean()) / sharp_real if sharp_real > 0 else None
        return {**mean, "rfid": metrics.frechet_distance(real, fake), "sharpness_kept": kept,
                "num_images": int(real.shape[0])}


class ReadbackAgreement:
    """Demo-reader agreement between originals and their reconstructions (see the module docstring). Object colour
    and position count only the originals in which the reader finds an object (a centre crop can cut it away), shape
    only those in which it reads a shape (a cut-off object fits no outline)."""

    def __init__(self):
        self.pairs: list[tuple] = []

    def add(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """``originals`` uint8 [N, 3, H, W]; ``reconstructions`` in [0, 1]."""
        from stages.evaluate.prompt_following import read_image

        recon_u8 = (reconstructions.clamp(0, 1) * 255).round().to(torch.uint8)
        for original, recon in zip(originals, recon_u8):
            self.pairs.append((read_image(original.permute(1, 2, 0).numpy()),
                               read_image(recon.permute(1, 2, 0).numpy())))

    def result(self) -> dict:
        if not self.pairs:
            raise ValueError("no reconstructions to read back")
        with_object = [(o, r) for o, r in self.pairs if o.object_color is not None]
        with_shape = [(o, r) for o, r in self.pairs if o.shape is not None]
        share = (lambda hits, total: sum(hits) / total if total else None)
        return {"object_color": share((o.object_color == r.object_color for o, r in with_object), len(with_object)),
                "background": share((o.background == r.background for o, r in self.pairs), len(self.pairs)),
                "position": share(((o.row, o.col) == (r.row, r.col) for o, r in with_object), len(with_object)),
                "shape": share((o.shape == r.shape for o, r in with_shape), len(with_shape)),
                "num_images": len(self.pairs), "num_with_object": len(with_object), "num_with_shape": len(with_shape)}


def is_demo_vocabulary(prompts: list[str]) -> bool:
    """True when at least 90% of ``prompts`` parse as demo captions (the reader's colours mean nothing elsewhere)."""
    from stages.evaluate.prompt_following import spec_from_caption

    return bool(prompts) and sum(spec_from_caption(p) is not None for p in prompts) >= 0.9 * len(prompts)


def reconstruction_metrics(originals: torch.Tensor, reconstructions: torch.Tensor, feature_net,
                           lpips_model=None) -> dict:
    """PSNR, SSIM, LPIPS (None without a model) and rFID of one set of reconstructions against its originals."""
    scores = ReconstructionScores(feature_net, lpips_model)
    scores.add(originals, reconstructions)
    return scores.result()


def load_vae(ref, cfg, device: torch.device):
    """The checkpoint's autoencoder, or the VAE the diffusion stages use when there is no folder."""
    from sdxl.presets import get_preset
    from stages.train.task_components import build_frozen_vae, load_trained_vae

    if ref.folder is None:
        vae, source = build_frozen_vae(cfg, device)
        return vae, source
    vae = load_trained_vae(ref.folder, get_preset(str(cfg.model.preset)))
    return vae.to(device).eval().requires_grad_(False), f"trained:{ref.folder}"


def evaluate_vae(cfg: DictConfig, ctx: StageContext) -> dict:
    from sdxl.sampling import to_pil
    from stages.evaluate import plots, report
    from stages.evaluate.features import build_image_network
    from stages.evaluate.generate import pick_device, resolve_checkpoint
    from stages.evaluate.heldout import iter_reference_batches
    from stages.evaluate.stage import check_references, heldout_set
    from stages.train.sample_grid import grid_png_bytes

    ev = cfg.evaluate
    device = pick_device(str(ev.get("device", "auto")))
    ref = resolve_checkpoint(ev.get("checkpoint"), ctx.root, "vae", bool(ev.get("allow_random", False)),
                             ctx.tracking_uri)
    vae, vae_source = load_vae(ref, cfg, device)
    net, net_weights = build_image_network(str(ev.get("fid_weights", "random_small")), int(ev.get("feature_seed", 0)))
    lpips_model, lpips_reason = metrics.build_lpips(ev.get("lpips_weights"), str(ev.get("lpips_net", "vgg")))
    if lpips_model is None:
        log.warning("LPIPS skipped: %s", lpips_reason)
    else:
        lpips_model = lpips_model.to(device)
    scores, rejects, pairs = ReconstructionScores(net.to(device), lpips_model), [], []
    heldout = heldout_set(cfg, ctx)
    readback = ReadbackAgreement() if is_demo_vocabulary(heldout.prompts) else None
    batch_size = int(ev.get("batch_size", 8))
    for originals in iter_reference_batches(heldout, int(ev.resolution), batch_size, rejects):
        recon = reconstruct(vae, originals, batch_size)
        scores.add(originals, recon)
        if readback is not None:
            readback.add(originals, recon)
        if len(pairs) < 8:  # original ‖ reconstruction, side by side
            pairs += list(torch.cat([originals.float() / 255.0, recon], dim=3)[:8 - len(pairs)])
    check_references(scores.count, rejects, ctx.dataset_dir)
    row = scores.result()
    row["psnr"] = metrics.finite_or_none(row["psnr"])
    flat = {"vae_psnr": row["psnr"], "vae_ssim": row["ssim"], "vae_lpips": row["lpips"], "vae_rfid": row["rfid"],
            "vae_sharpness_kept": row["sharpness_kept"]}
    lpips_state = "on" if lpips_model is not None else f"skipped: {lpips_reason}"
    preamble = (f"Autoencoder: {vae_source}; {row['num_images']} held-out images at {int(ev.resolution)} px. "
                f"rFID features: {net_weights}. LPIPS: {lpips_state}.")
    read = readback.result() if readback is not None else "skipped: the held-out captions are not demo data"
    if isinstance(read, dict):
        flat.update({f"vae_readback_{k}": read[k] for k in READBACK_KEYS if read[k] is not None})
        preamble += (" Demo reader on reconstructions vs originals (a ceiling on the base's prompt-following): "
                     + ", ".join(f"{k.replace('_', ' ')} {_fmt(read[k])}" for k in READBACK_KEYS) + ".")
        log.info("autoencoder read-back on %d held-out demo images (%d with an object, %d with a shape): object "
                 "colour %s, background %s, position %s, shape %s", read["num_images"], read["num_with_object"],
                 read["num_with_shape"], *[_fmt(read[k]) for k in READBACK_KEYS])
    summary = {"kind": "vae", "checkpoint": ref.description, "vae_source": vae_source,
               "feature_weights": net_weights, "lpips": lpips_state, "num_references": row["num_images"],
               "reference_rejects": len(rejects), "rows": [row], "readback": read, "metrics": flat}
    files = {"results.csv": plots.table_csv([row], TABLE_COLUMNS),
             "results.md": plots.table_markdown([row], TABLE_COLUMNS, preamble),
             "reconstructions.png": grid_png_bytes(to_pil(torch.stack(pairs)), cols=2),
             "summary.json": json.dumps(summary, indent=2, sort_keys=True).encode("utf-8")}
    published = report.publish(ctx, ref, files, flat, [], bool(ev.get("log_to_training_run", True)))
    return {**summary, **published}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
