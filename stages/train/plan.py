"""The dry-run plan (``train.dry_run=true``): batch split and a per-GPU memory estimate, without training.

Model states per GPU (P = trainable parameters, N = world size; bytes per parameter):

| strategy     | weights      | grads        | optimizer (AdamW)          | EMA (fp32)  |
|--------------|--------------|--------------|----------------------------|-------------|
| ddp          | 4 (fp32)     | 4            | 8 (m, v)                   | 4           |
| fsdp (FSDP2) | 4/N          | 4/N          | 8/N                        | 4/N         |
| ZeRO-1       | 2 (bf16)     | 2            | 12/N (fp32 master, m, v)   | 4           |
| ZeRO-2       | 2            | 2/N          | 12/N                       | 4           |
| ZeRO-3       | 2/N          | 2/N          | 12/N                       | 4/N         |

(on CPU DeepSpeed runs fp32: weights and grads 4 bytes). FSDP and ZeRO-3 also hold the largest wrap unit
unsharded (bf16 params + grads) twice (current + prefetched). Frozen helpers (text encoders, VAE) are bf16 replicas.

Activations, per sample, bf16, from the UNet config at the stage resolution R (latent side R/8, halved per level):
a ResnetBlock2D keeps ~10 tensors of its feature-map size (norms, SiLUs, convs, residual), a BasicTransformerBlock
~30 (norms, q/k/v/out for self- and cross-attention with memory-efficient SDPA — no N² score matrix —, the 8c-wide
GEGLU projection and its 4c halves). With activation checkpointing each wrap unit (ResnetBlock2D,
Transformer2DModel) keeps only its input, plus the largest unit's full activations while it is recomputed.
For the VAE task only resnets are counted (encoder + decoder, at pixel resolution). Add a fixed 3 GB for the CUDA
context, NCCL buffers and allocator fragmentation. These are estimates for planning, not measurements.
"""

from __future__ import annotations

from omegaconf import OmegaConf

RESNET_SAVED = 10
TRANSFORMER_SAVED = 30
ACT_BYTES = 2
OVERHEAD_GB = 3.0
GB = 2**30

# bytes/param: (weights, grads, optimizer, ema, weights_sharded, grads_sharded, optim_sharded, ema_sharded)
_STATE_BYTES = {
    "ddp": (4, 4, 8, 4, False, False, False, False),
    "fsdp": (4, 4, 8, 4, True, True, True, True),
    "zero1": (2, 2, 12, 4, False, False, True, False),
    "zero2": (2, 2, 12, 4, False, True, True, False),
    "zero3": (2, 2, 12, 4, True, True, True, True),
}


def sharding_key(strategy: str, zero_stage: int) -> str:
    if strategy == "deepspeed":
        if int(zero_stage) not in (1, 2, 3):
            raise ValueError(f"train.zero_stage must be 1, 2 or 3, got {zero_stage}")
        return f"zero{int(zero_stage)}"
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"train.strategy must be ddp, fsdp or deepspeed, got {strategy!r}")
    return strategy


def unet_levels(unet_cfg: dict, resolution: int, vae_downsample: int = 8) -> list[dict]:
    """Per UNet level: feature-map side, channels, resnets, transformer blocks (down + up + mid)."""
    side = resolution // vae_downsample
    channels = list(unet_cfg["block_out_channels"])
    depth = unet_cfg["transformer_layers_per_block"]
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(channels)
    n = int(unet_cfg["layers_per_block"])
    levels = []
    for i, c in enumerate(channels):
        attn = "CrossAttn" in unet_cfg["down_block_types"][i]
        levels.append({"side": max(1, side >> i), "channels": c, "resnets": n + (n + 1),
                       "transformer_units": (2 * n + 1) if attn else 0, "depth": depth[i] if attn else 0})
    mid = levels[-1]
    mid["resnets"] += 2
    mid["transformer_units"] += 1  # mid block: one Transformer2DModel at the last level's depth
    mid["depth"] = mid["depth"] or depth[-1]
    return levels


def unet_activation_bytes(unet_cfg: dict, resolution: int, checkpointing: bool) -> float:
    """Per-sample activation bytes of one UNet forward/backward at ``resolution``² pixels (see module doc)."""
    total, units_inputs, largest_unit = 0.0, 0.0, 0.0
    for lv in unet_levels(unet_cfg, resolution):
        fmap = lv["side"] ** 2 * lv["channels"]
        resnet = RESNET_SAVED * fmap
        transformer_unit = TRANSFORMER_SAVED * fmap * lv["depth"]
        total += lv["resnets"] * resnet + lv["transformer_units"] * transformer_unit
        units_inputs += (lv["resnets"] + lv["transformer_units"]) * fmap
        largest_unit = max(largest_unit, resnet, transformer_unit if lv["transformer_units"] else 0.0)
    elements = units_inputs + largest_unit if checkpointing else total
    return elements * ACT_BYTES


def vae_activation_bytes(vae_cfg: dict, resolution: int, checkpointing: bool) -> float:
    channels = list(vae_cfg["block_out_channels"])
    n = int(vae_cfg["layers_per_block"])
    total, inputs, largest = 0.0, 0.0, 0.0
    for i, c in enumerate(channels):
        fmap = max(1, resolution >> i) ** 2 * c
        count = n + (n + 1)  # encoder + decoder resnets at this level
        total += count * RESNET_SAVED * fmap
        inputs += count * fmap
        largest = max(largest, RESNET_SAVED * fmap)
    return (inputs + largest if checkpointing else total) * ACT_BYTES


def model_counts(preset: str, kind: str) -> dict:
    """Trainable, frozen and largest-unit parameter counts from models built on the meta device."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from sdxl.models import build_on_meta, count_parameters

    meta = build_on_meta(preset)
    if kind == "vae":
        trainable, frozen = meta["vae"], []
    else:
        trainable = meta[f"unet_{kind}"]
        frozen = [meta["vae"], meta["text_encoder_g"]] + ([meta["text_encoder_l"]] if kind == "base" else [])
    units = [m for m in trainable.modules() if isinstance(m, (Transformer2DModel, ResnetBlock2D))]
    return {"trainable": count_parameters(trainable), "frozen": sum(count_parameters(m) for m in frozen),
            "largest_unit": max((count_parameters(u) for u in units), default=0)}


def make_plan(*, kind: str, preset: str, resolution: int, world_size: int, micro_batch_size: int,
              global_batch_size: int, strategy: str, zero_stage: int = 2, activation_checkpointing: bool = False,
              gpu_memory_gb: float = 80.0, param_counts: dict | None = None) -> dict:
    """The plan as a JSON-able dict; ``param_counts`` ({trainable, frozen, largest_unit}) skips the meta build."""
    from sdxl.presets import get_preset

    from stages.train.loop import accumulation_steps

    accum = accumulation_steps(global_batch_size, micro_batch_size, world_size)
    counts = param_counts or model_counts(preset, kind)
    p, n = float(counts["trainable"]), float(world_size)
    key = sharding_key(strategy, zero_stage)
    w, g, o, e, ws, gs, os_, es = _STATE_BYTES[key]
    states = {"weights": w * p / (n if ws else 1), "grads": g * p / (n if gs else 1),
              "optimizer": o * p / (n if os_ else 1), "ema": e * p / (n if es else 1)}
    if key in ("fsdp", "zero3"):
        states["unsharded_units"] = 2 * 2 * 2 * float(counts["largest_unit"])  # (params + grads) bf16, ×2 prefetch
    spec = get_preset(preset)
    if kind == "vae":
        per_sample = vae_activation_bytes(spec.vae, resolution, activation_checkpointing)
    else:
        per_sample = unet_activation_bytes(spec.unet_config(kind), resolution, activation_checkpointing)
    memory = {k: v / GB for k, v in states.items()}
    memory["frozen_models"] = 2 * float(counts["frozen"]) / GB
    memory["activations"] = per_sample * micro_batch_size / GB
    memory["overhead"] = OVERHEAD_GB
    total = sum(memory.values())
    return {
        "kind": kind, "preset": preset, "resolution": resolution, "strategy": strategy,
        "sharding": key, "world_size": world_size, "micro_batch_size": micro_batch_size,
        "accumulation_steps": accum, "images_per_step": micro_batch_size * world_size * accum,
        "activation_checkpointing": activation_checkpointing,
        "params": {k: int(v) for k, v in counts.items()},
        "activation_gb_per_sample": per_sample / GB,
        "memory_gb_per_gpu": {k: round(v, 3) for k, v in memory.items()},
        "total_gb_per_gpu": round(total, 3), "gpu_memory_gb": gpu_memory_gb, "fits": total <= gpu_memory_gb,
    }


def plan_from_cfg(cfg, world_size: int) -> dict:
    """The plan of a stage config: kind from ``train.task``, resolution from ``loader.resolution``."""
    tc = cfg.train
    sel = OmegaConf.select
    preset = sel(cfg, "model.preset") or sel(cfg, "preset_name") or "tiny"
    resolution = int(sel(cfg, "loader.resolution") or sel(cfg, "train.resolution") or 256)
    return make_plan(kind=str(tc.get("task", "base")), preset=str(preset), resolution=resolution,
                     world_size=world_size, micro_batch_size=int(tc.micro_batch_size),
                     global_batch_size=int(tc.global_batch_size), strategy=str(tc.strategy),
                     zero_stage=int(tc.zero_stage), activation_checkpointing=bool(tc.activation_checkpointing),
                     gpu_memory_gb=float(tc.get("plan_gpu_memory_gb", 80)))


def format_plan(plan: dict) -> str:
    lines = [
        f"training plan: {plan['kind']} ({plan['preset']}) at {plan['resolution']}px, {plan['strategy']} "
        f"[{plan['sharding']}], activation checkpointing {'on' if plan['activation_checkpointing'] else 'off'}",
        f"  world size {plan['world_size']} × micro-batch {plan['micro_batch_size']} × accumulation "
        f"{plan['accumulation_steps']} = {plan['images_per_step']} images per optimizer step",
        f"  parameters: trainable {plan['params']['trainable']:,}, frozen {plan['params']['frozen']:,}",
        f"  activations ≈ {plan['activation_gb_per_sample']:.3f} GB per sample",
        "  memory per GPU (GB):",
    ]
    lines += [f"    {k:<16} {v:9.2f}" for k, v in plan["memory_gb_per_gpu"].items()]
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"    {'total':<16} {plan['total_gb_per_gpu']:9.2f}  → {verdict} in {plan['gpu_memory_gb']} GB")
    return "\n".join(lines)
