"""Stage name → the function that runs it, imported only when that stage runs (so a stage's heavy imports, or
a missing optional dependency, never slow down or break another stage)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


class ConfigError(ValueError):
    """A bad or missing config value, found before the stage starts: the message says what to set."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    target: str  # "module:function" with signature run(cfg, ctx) -> dict
    help: str
    needs_ray: bool = True
    # Files whose existence means the stage finished (format fields: root, dataset, stage, demo_out); a chained
    # workflow re-runs a stage when one is missing, even if its completion marker is there.
    outputs: tuple[str, ...] = ()
    # Long stages get the Ray dashboard when `ray.include_dashboard=auto` (the default).
    long_running: bool = False
    # Config keys the stage cannot run without: (key, what to give), checked before Ray starts.
    requires: tuple[tuple[str, str], ...] = ()

    def check_config(self, cfg) -> None:
        """Fail early, in one sentence, when a required key is unset."""
        from omegaconf import OmegaConf

        for key, what in self.requires:
            if OmegaConf.select(cfg, key, default=None) in (None, ""):
                raise ConfigError(f"stage={self.name} needs {key}=...: {what}")

    def expected_outputs(self, cfg) -> list[str]:
        fields = {"root": str(cfg.paths.root).rstrip("/"), "dataset": str(cfg.data.name), "stage": self.name,
                  "demo_out": str(cfg.demo.out_dir).rstrip("/")}
        return [template.format(**fields) for template in self.outputs]

    def load(self) -> Callable:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


_DATA = "{root}/data/{dataset}"
_FINAL = ("{root}/runs/{stage}/final/info.json",)
_SOURCE = (("ingest.source", "a folder of images with .txt captions, a URL list (.parquet/.csv/.jsonl) or a folder "
                             "of .tar/.parquet shards"),)
_LONG = {"long_running": True}

_SPECS = [
    StageSpec("demo_data", "stages.data.demo_data:run", "generate the synthetic captioned demo image folder", False,
              ("{demo_out}/_SUCCESS.json",)),
    StageSpec("ingest", "stages.data.ingest:run", "plan the source into work units (no bytes read)",
              requires=_SOURCE, **_LONG),
    StageSpec("filter", "stages.data.filter:run", "re-score a finished dataset (a metadata layer)",
              **_LONG),
    StageSpec("caption", "stages.data.caption:run", "re-caption a finished dataset (a metadata layer)",
              **_LONG),
    StageSpec("buckets", "stages.data.buckets:run", "manifest, shard index, stats, plots from the pass",
              **_LONG),
    StageSpec("data", "stages.data.pipeline:run", "one pass: read, check, score, caption, bucket, shard", True,
              (f"{_DATA}/manifest.parquet", f"{_DATA}/rejects.parquet", f"{_DATA}/stats.json"),
              requires=_SOURCE, **_LONG),
    StageSpec("model_summary", "stages.model_summary:run", "parameter counts of a preset (meta device)", False),
    StageSpec("cache_latents", "stages.train.cache_latents:run",
              "frozen VAE + text encoders → latent shards (Ray Data)", **_LONG),
    StageSpec("train_vae", "stages.train.stage_entry:run",
              "the autoencoder: reconstruction + KL (+ LPIPS, GAN), EMA", True, _FINAL, **_LONG),
    StageSpec("pretrain256", "stages.train.stage_entry:run",
              "base UNet at 256², size + crop conditioning (Alg. 1)", True, _FINAL, **_LONG),
    StageSpec("pretrain512", "stages.train.stage_entry:run",
              "base UNet at 512², from pretrain256", True, _FINAL, **_LONG),
    StageSpec("finetune_aspect", "stages.train.stage_entry:run",
              "multi-aspect buckets ≈1024², offset noise 0.05", True, _FINAL, **_LONG),
    StageSpec("finetune_quality", "stages.train.stage_entry:run",
              "curated subset by aesthetic + CLIP score, lower lr", True, _FINAL, **_LONG),
    StageSpec("train_refiner", "stages.train.stage_entry:run",
              "refiner UNet on the first 200 noise levels", True, _FINAL, **_LONG),
    StageSpec("evaluate", "stages.evaluate.stage:run",
              "FID / CLIP score / IS over guidance scales (Fig. 12), or VAE PSNR/SSIM/LPIPS/rFID", False),
    StageSpec("export", "stages.export:run", "diffusers folders + single-file SDXL checkpoints under <root>/export",
              False),
    StageSpec("serve", "stages.serve.app:run", "Ray Serve app on 127.0.0.1:8000: text encoders → base → refiner → VAE",
              **_LONG),
    StageSpec("generate", "stages.generate:run", "images through the Serve app over HTTP, saved under <root>/generated"),
    StageSpec("demo", "pipeline.workflow:run_demo", "the whole chain on generated demo data at the tiny preset",
              **_LONG),
    StageSpec("learning_check", "pipeline.workflow:run_learning_check",
              "a few-minute chain that trains the tiny base on demo data and fails unless it follows its prompts",
              **_LONG),
    StageSpec("paper_effects", "pipeline.workflow:run_paper_effects",
              "the models experiments/paper_effects.py measures: bases with / without size conditioning, without "
              "small images, and a refiner", **_LONG),
]
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in _SPECS}


def get_stage(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        known = ", ".join(STAGES)
        raise ConfigError(f"unknown stage={name!r}; known stages: {known}") from None


def help_text() -> str:
    width = max(len(n) for n in STAGES)
    lines = [
        "usage: python pipeline/run.py stage=<name> [preset=tiny|full] [key=value ...]",
        "       ray job submit --address http://HEAD:8265 --working-dir . -- python pipeline/run.py stage=<name> ...",
        "",
        "stages:",
    ]
    lines += [f"  {spec.name:<{width}}  {spec.help}" for spec in _SPECS]
    lines += [
        "",
        "common keys: paths.root=DIR_OR_URI  ingest.source=PATH_OR_URI  mlflow.tracking_uri=URI",
        "             cluster.num_workers=N  cluster.use_gpu=true  train.max_steps=N  train.strategy=ddp|fsdp|deepspeed",
        "show the composed config: python pipeline/run.py stage=<name> --cfg job",
        "",
        "Each stage ends with a short summary; its full result is written to <root>/results/<stage>.json and its log",
        "to <root>/logs/<stage>.log. --json prints the full result as JSON on stdout instead (for scripts).",
        "An error ends in one line on stderr (exit status 1); HYDRA_FULL_ERROR=1 shows the whole trace.",
    ]
    return "\n".join(lines)
