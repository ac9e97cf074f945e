"""Chained stages (the `demo` workflow) with completion markers, so a re-run skips what is done.

A chain is declarative: `workflow.chain` lists step names, `workflow.overrides.<step>` adds overrides for one
step. A step is a stage name, or a name `workflow.aliases` maps to a stage (so one stage can run twice with different
overrides, e.g. `evaluate_vae: evaluate`). Each stage's config is composed exactly as `python pipeline/run.py stage=<name> <user overrides>` would,
and its MLflow run is nested under the workflow's run. A stage is skipped when its marker
`<root>/workflow/<name>/<stage>.json` records the same config hash and every output it listed, and every output the
registry expects of it (`StageSpec.outputs`), still exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from hydra import compose
from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.context import StageContext

log = logging.getLogger(__name__)


def config_hash(cfg: DictConfig) -> str:
    """A stage's resolved config, without the `workflow` section: that is the chain's bookkeeping, and a stage's own
    entry in it already reaches the hash through the overrides composed into that stage's config."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("workflow", None)
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_done(marker_uri: str, digest: str, expected: list[str]) -> bool:
    if not storage.exists(marker_uri):
        return False
    try:
        marker = storage.read_json(marker_uri)
    except (OSError, ValueError):
        return False
    if marker.get("config_hash") != digest:
        return False
    return all(storage.exists(path) for path in [*expected, *marker.get("outputs", [])])


def compose_stage_config(stage: str, user_overrides: list[str], extra: list[str]) -> DictConfig:
    # `workflow.*` configures the chain itself (e.g. `workflow.chain=[...]` on the command line); its stages lack it.
    kept = [o for o in user_overrides
            if not o.split("=", 1)[0].lstrip("+~") in ("stage",) and not o.lstrip("+~").startswith("workflow.")]
    # The user's command line comes after the chain's per-step overrides, so it wins over them (as it wins over the
    # stage files): `stage=demo train.max_steps=2` trains every stage for 2 steps.
    return compose(config_name="config", overrides=[*extra, *kept, f"stage={stage}"])


def _flatten(overrides: list) -> list[str]:
    """A step's overrides with nested lists spliced in: steps share settings through a YAML anchor (`- *recipe`)."""
    flat: list[str] = []
    for item in overrides:
        flat += _flatten(item) if isinstance(item, list) else [str(item)]
    return flat


def run_chain(cfg: DictConfig, ctx: StageContext, name: str) -> dict:
    from pipeline.dispatch import execute  # late: dispatch imports the registry, which names this module
    from pipeline.registry import get_stage

    chain = list(cfg.workflow.chain)
    per_stage = OmegaConf.to_container(cfg.workflow.get("overrides") or {}, resolve=True)
    user = list(ctx.extra.get("overrides", []))
    results: dict[str, dict] = {}
    aliases = cfg.workflow.get("aliases")
    aliases = OmegaConf.to_container(aliases, resolve=True) if aliases is not None else {}
    for step in chain:
        stage = str(aliases.get(step, step))
        extra = [f"paths.root={ctx.root}", *_flatten(per_stage.get(step, []))]
        stage_cfg = compose_stage_config(stage, user, extra)
        digest = config_hash(stage_cfg)
        marker = storage.join(ctx.root, "workflow", name, f"{step}.json")
        expected = get_stage(stage).expected_outputs(stage_cfg)
        if _is_done(marker, digest, expected):
            log.info("workflow %s: %s is complete, skipping", name, step)
            results[step] = {"skipped": True}
            continue
        log.info("workflow %s: running %s", name, step if step == stage else f"{step} ({stage})")
        result = execute(stage, stage_cfg, overrides=[*user, *extra], parent_run_id=ctx.run_id)
        storage.write_json_atomic(marker, {"config_hash": digest, "finished_at": time.time(),
                                           "outputs": result.get("outputs", []), "result": result})
        results[step] = result
    return {"workflow": name, "stages": results}


def run_demo(cfg: DictConfig, ctx: StageContext) -> dict:
    return run_chain(cfg, ctx, "demo")
