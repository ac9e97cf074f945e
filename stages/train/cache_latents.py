"""Stage ``cache_latents``: run the frozen VAE and text encoders over the shards once, so training reads latents.

For the loader settings of the stage it serves (``loader.resolution / multi_aspect / bucket_multiple / filter /
top_k_by``) every selected sample gets one crop (Alg. 1 or its bucket's) and one caption pick, drawn from
``(cache.seed, key)`` and recorded. Output, beside the shards, in ``<dataset>/latents/<cache_name>/``:
- ``<H>x<W>/<source-shard>.safetensors`` per source tar: ``latent_parameters`` [N, 8, h, w] (VAE posterior
  mean ‖ logvar, so training still samples the posterior), ``context`` [N, 77, C] (CLIP-L ‖ bigG penultimate),
  ``pooled`` [N, P], ``original_size`` / ``crop_coords`` / ``target_size`` [N, 2]; metadata: keys, captions, bucket;
- ``_uncond.safetensors`` (the empty prompt's context and pooled, for CFG dropout) and ``cache_info.json``.
Buckets with fewer than ``cache.min_bucket_samples`` samples are merged here (the loader cannot re-crop latents).
Each file is written atomically and skipped when present, so an interrupted run resumes; a cache made with other
settings is refused, naming its ``cache_info.json``.

Pure core: :func:`plan_cache` and :func:`encode_shard` (no Ray); :class:`CacheActor` is the Ray Data wrapper.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save as safetensors_save

from pipeline import storage
from sdxl.buckets import bucket_name
from sdxl.crops import bucket_crop_resize
from sdxl.presets import get_preset
from stages.train.bucket_schedule import merge_small_buckets
from stages.train.data_loader import choose_caption, decode_rgb, original_size, pil_to_tensor
from stages.train.data_manifest import dataset_dir_from_cfg, latent_cache_dir, select_samples, stage_buckets
from stages.train.data_shards import TarShardReader, sample_member
from stages.train.task_components import build_frozen_parts, encode_posterior, resolve_vae_source
from stages.train.task_diffusion import UNCOND_FILE
from stages.train.tasks import DIFFUSERS_WEIGHTS, task_option

log = logging.getLogger(__name__)
INFO_FILE = "cache_info.json"
CACHE_DEFAULTS = {"num_actors": 1, "num_gpus": 0, "batch_size": 8, "seed": 0, "min_bucket_samples": 1,
                  "dtype": "float16"}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cache_settings(cfg) -> dict:
    section = cfg.get("cache") or {}
    out = {k: section.get(k, v) for k, v in CACHE_DEFAULTS.items()}
    if out["dtype"] not in _DTYPES:
        raise ValueError(f"cache.dtype must be one of {list(_DTYPES)}, got {out['dtype']!r}")
    return out


def cache_identity(cfg) -> dict:
    """What makes two caches interchangeable; stored in cache_info.json and compared on every run."""
    lc, s = cfg.loader, cache_settings(cfg)
    model = cfg.get("model") or {}
    return {"preset": str(cfg.model.preset), "pretrained": model.get("pretrained"),
            "resolution": int(lc.resolution), "multi_aspect": bool(lc.multi_aspect),
            "bucket_multiple": int(lc.bucket_multiple), "crop_mode": str(lc.get("crop_mode", "random")),
            "filter": lc.get("filter"), "top_k_by": OmegaConf.to_container(lc.top_k_by) if lc.get("top_k_by") else None,
            "synthetic_caption_prob": float(lc.synthetic_caption_prob), "seed": int(s["seed"]),
            "min_bucket_samples": int(s["min_bucket_samples"]), "dtype": s["dtype"],
            "vae": vae_identity(cfg), "text_encoders": text_encoder_identity(cfg)}


def text_encoder_identity(cfg) -> str:
    """Which frozen text encoders encode the captions: pretrained ones by their source; random ones by everything
    their weights follow from (the preset's text configs, embedding std and the seed), so a cache made with other
    random encoders is recognised as stale."""
    source = (cfg.get("model") or {}).get("pretrained")
    if source:
        return f"pretrained:{source}"
    preset = get_preset(str(cfg.model.preset))
    recipe = [preset.text_encoder_l, preset.text_encoder_g, preset.clip_l_embedding_std, int(task_option(cfg, "seed"))]
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return f"random:{preset.name}@{digest}"


def vae_identity(cfg) -> str:
    """Which frozen VAE encodes the latents. A trained one is named by its folder and the hash of its weights, so a
    cache made before ``train_vae`` re-ran is recognised as stale instead of silently training on old latents."""
    kind, source = resolve_vae_source(cfg)
    if kind != "trained":
        return f"{kind}:{source}"
    weights = storage.read_bytes(storage.join(source, DIFFUSERS_WEIGHTS))
    return f"trained:{source}@sha256:{hashlib.sha256(weights).hexdigest()[:16]}"


def same_vae(have, want) -> bool:
    """Whether two VAE identities name the same weights. A trained VAE is known by its weights' hash, not by where its
    folder is: a copied or moved root keeps its caches (the folder in the identity only says where it came from)."""
    if have == want:
        return True
    have, want = str(have or ""), str(want or "")
    marker = "@sha256:"
    if not (have.startswith("trained:") and want.startswith("trained:") and marker in have and marker in want):
        return False
    return have.rsplit(marker, 1)[1] == want.rsplit(marker, 1)[1]


def identity_differences(existing: dict, identity: dict) -> list[str]:
    """The keys in which two cache identities differ (the VAE compared by :func:`same_vae`)."""
    identity = json.loads(json.dumps(identity))  # as it reads back from cache_info.json
    return sorted(k for k in set(existing) | set(identity)
                  if not (same_vae if k == "vae" else operator.eq)(existing.get(k), identity.get(k)))


def key_seed(seed: int, key: str) -> list[int]:
    """A per-sample seed sequence from the cache seed and the key (independent of processing order)."""
    return [int(seed), int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")]


def plan_cache(cfg) -> list[dict]:
    """One item per source shard: its selected keys, the bucket they are cached at, and the output file."""
    samples = select_samples(cfg, dataset_dir_from_cfg(cfg))
    lc = cfg.loader
    buckets = stage_buckets(samples, int(lc.resolution), int(lc.bucket_multiple), bool(lc.multi_aspect),
                            bool(lc.require_table_match))
    counts: dict = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    mapping = merge_small_buckets(counts, int(cache_settings(cfg)["min_bucket_samples"])).mapping
    cache_dir = latent_cache_dir(cfg)
    items: dict[tuple[str, tuple[int, int]], dict] = {}
    for shard, key, b in zip(samples["shard"], samples["key"], buckets):
        target = mapping[b]
        item = items.setdefault((str(shard), target), {
            "shard": str(shard), "bucket": list(target), "keys": [],
            "out": storage.join(cache_dir, bucket_name(target), _output_name(str(shard)))})
        item["keys"].append(str(key))
    return sorted(items.values(), key=lambda it: it["out"])


def _output_name(shard: str) -> str:
    """The source shard's path (relative to the dataset) as one file name, so no two shards collide."""
    stem = shard[: -len(".tar")] if shard.endswith(".tar") else shard
    return stem.replace("/", "__").replace("\\", "__") + ".safetensors"


@torch.no_grad()
def encode_shard(item: dict, samples_by_key: dict, reader: TarShardReader, parts, settings: dict, cfg) -> bytes:
    """The safetensors bytes of one output file (pure: reads images, runs the frozen models, stacks results)."""
    bucket = tuple(item["bucket"])
    dtype = _DTYPES[settings["dtype"]]
    crop_mode = str(cfg.loader.get("crop_mode", "random"))
    synthetic_prob = float(cfg.loader.synthetic_caption_prob)
    pixels, captions, sizes, crops = [], [], [], []
    for key in item["keys"]:
        row = samples_by_key[key]
        rng = np.random.default_rng(key_seed(int(settings["seed"]), key))
        image = decode_rgb(reader.image_bytes(item["shard"], sample_member(row)))
        cropped, info = bucket_crop_resize(image, bucket, rng=rng, mode=crop_mode)
        pixels.append(pil_to_tensor(cropped))
        captions.append(choose_caption(row, rng, synthetic_prob))
        sizes.append(original_size(row, image))
        crops.append(info.c_crop)
    latents, contexts, pooled = [], [], []
    step = max(1, int(settings["batch_size"]))
    for start in range(0, len(pixels), step):
        latents.append(encode_posterior(parts.vae, torch.stack(pixels[start:start + step])).cpu())
        context, pool = parts.conditioner.encode(captions[start:start + step])
        contexts.append(context.cpu())
        pooled.append(pool.cpu())
    n = len(item["keys"])
    tensors = {
        "latent_parameters": torch.cat(latents).to(dtype).contiguous(),
        "context": torch.cat(contexts).to(dtype).contiguous(),
        "pooled": torch.cat(pooled).to(dtype).contiguous(),
        "original_size": torch.tensor(sizes, dtype=torch.int64),
        "crop_coords": torch.tensor(crops, dtype=torch.int64),
        "target_size": torch.tensor([bucket] * n, dtype=torch.int64),
    }
    metadata = {"keys": json.dumps(item["keys"]), "captions": json.dumps(captions), "bucket": bucket_name(bucket),
                "source_shard": item["shard"]}
    return safetensors_save(tensors, metadata=metadata)


class CacheActor:
    """Ray Data actor: loads the frozen models once, then encodes one source shard per call."""

    def __init__(self, cfg: dict, device: str):
        self.cfg = OmegaConf.create(cfg)
        self.settings = cache_settings(self.cfg)
        self.parts = build_frozen_parts(self.cfg, "base", torch.device(device))
        samples = select_samples(self.cfg, dataset_dir_from_cfg(self.cfg))
        self.samples_by_key = {r["key"]: r for r in samples.to_dict("records")}
        self.reader = TarShardReader(dataset_dir_from_cfg(self.cfg))
        cache_dir = latent_cache_dir(self.cfg)
        if not storage.exists(storage.join(cache_dir, UNCOND_FILE)):  # identical bytes from any actor: races are harmless
            write_uncond(cache_dir, self.parts, _DTYPES[self.settings["dtype"]])

    def process(self, item: dict) -> int:
        if storage.exists(item["out"]):  # finished by an earlier (interrupted) run
            return 0
        data = encode_shard(item, self.samples_by_key, self.reader, self.parts, self.settings, self.cfg)
        storage.write_bytes_atomic(item["out"], data)
        return len(item["keys"])

    def __call__(self, batch: dict) -> dict:
        written = [self.process(json.loads(str(raw))) for raw in batch["item"]]
        return {"written": np.asarray(written, dtype=np.int64)}


# The frozen models' identities: a cache that differs only in these was made before they were retrained, and the
# cache stage re-encodes it (cache.replace_stale_models); any other difference is another cache's settings.
MODEL_KEYS = frozenset({"vae", "text_encoders"})


def _check_or_write_info(cache_dir: str, identity: dict, replace_stale_models: bool = False) -> None:
    info_uri = storage.join(cache_dir, INFO_FILE)
    if storage.is_file(info_uri):
        existing = storage.read_json(info_uri).get("identity", {})
        differs = identity_differences(existing, identity)
        if not differs:
            return
        if not (replace_stale_models and set(differs) <= MODEL_KEYS):
            raise ValueError(f"latent cache {info_uri} was made with other settings ({differs}); set "
                             f"loader.cache_name to a new name or delete {cache_dir}")
        # A re-run after train_vae retrained: the old latents describe weights that no longer exist.
        log.warning("latent cache %s was encoded by other frozen models (%s); encoding it again", cache_dir,
                    ", ".join(differs))
        storage.remove(cache_dir)
    storage.write_json_atomic(info_uri, {"identity": identity})


def write_uncond(cache_dir: str, parts, dtype: torch.dtype) -> None:
    context, pooled = parts.conditioner.encode([""])
    storage.write_bytes_atomic(storage.join(cache_dir, UNCOND_FILE), safetensors_save(
        {"context": context.cpu().to(dtype).contiguous(), "pooled": pooled.cpu().to(dtype).contiguous()}))


def run(cfg: DictConfig, ctx) -> dict:
    """Stage entry: plan, check the existing cache, encode pending shards on Ray Data actors, write the extras."""
    settings = cache_settings(cfg)
    cache_dir = latent_cache_dir(cfg)
    identity = cache_identity(cfg)
    plan = plan_cache(cfg)
    _check_or_write_info(cache_dir, identity, bool(cfg.cache.get("replace_stale_models", True)))
    pending = [it for it in plan if not storage.exists(it["out"])]
    use_gpu = float(settings["num_gpus"]) > 0
    device = "cuda" if use_gpu else "cpu"
    container = OmegaConf.to_container(cfg, resolve=True)
    if pending:
        import ray

        log.info("cache_latents: %d of %d shard files to encode into %s", len(pending), len(plan), cache_dir)
        dataset = ray.data.from_items([{"item": json.dumps(it)} for it in pending], override_num_blocks=len(pending))
        extra = {"num_gpus": float(settings["num_gpus"])} if use_gpu else {}
        dataset.map_batches(CacheActor, fn_constructor_kwargs={"cfg": container, "device": device}, batch_size=1,
                            batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=min(int(settings["num_actors"]), len(pending))),
                            num_cpus=1, **extra).take_all()
        missing = [it["out"] for it in pending if not storage.exists(it["out"])]
        if missing:
            raise RuntimeError(f"cache_latents: {len(missing)} file(s) were not written, e.g. {missing[0]}")
    if not storage.exists(storage.join(cache_dir, UNCOND_FILE)):
        parts = build_frozen_parts(cfg, "base", torch.device("cpu"))
        write_uncond(cache_dir, parts, _DTYPES[settings["dtype"]])
    summary = {"cache_dir": cache_dir, "files": len(plan), "encoded_files": len(pending),
               "samples": sum(len(it["keys"]) for it in plan),
               "buckets": sorted({bucket_name(tuple(it["bucket"])) for it in plan}),
               # a chained run (stage=demo) re-runs this step when the cache is gone
               "outputs": [storage.join(cache_dir, INFO_FILE)]}
    ctx.log_dict(summary, "cache_latents.json")
    return summary
