"""Chained stages (the `demo` and `learning_check` workflows) with completion markers, so a re-run skips what is done.

A chain is declarative: `workflow.chain` lists step names, `workflow.every_step` overrides that every step gets (the
demo's `model.preset=micro`), `workflow.overrides.<step>` adds overrides for one step, after those. A step is a stage
name, or a name `workflow.aliases` maps to a stage (so one stage can run twice with different overrides, e.g.
`evaluate_vae: evaluate`). Each stage's config is composed exactly as `python pipeline/run.py stage=<name> <user
overrides>` would, and its MLflow run is nested under the workflow's run. A stage is skipped when its marker
`<root>/workflow/<name>/<stage>.json` records the same config hash and every output it listed, and every output the
registry expects of it (`StageSpec.outputs`), still exists. The hash is chained: it covers the step's own config and
the steps before it (their configs and when they last ran), because a later step reads what the earlier ones wrote:
a changed or re-run step re-runs every step after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from hydra import compose
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pipeline import storage
from pipeline.context import StageContext

log = logging.getLogger(__name__)

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
_ABSENT = object()


def config_hash(cfg: DictConfig) -> str:
    """A stage's resolved config, without the `workflow` section: that is the chain's bookkeeping, and a stage's own
    entry in it already reaches the hash through the overrides composed into that stage's config."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("workflow", None)
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def chained_hash(upstream: str, digest: str) -> str:
    """A step's hash in its chain: its own config hash after everything the steps before it were made from."""
    return hashlib.sha256(f"{upstream}|{digest}".encode()).hexdigest()[:16]


def _done_marker(marker_uri: str, digest: str, expected: list[str]) -> dict | None:
    """The step's marker when it is complete for ``digest`` (every output still there), else None."""
    if not storage.exists(marker_uri):
        return None
    try:
        marker = storage.read_json(marker_uri)
    except (OSError, ValueError):
        return None
    if marker.get("config_hash") != digest:
        return None
    return marker if all(storage.exists(path) for path in [*expected, *marker.get("outputs", [])]) else None


def _for_the_chain(override: str) -> bool:
    """`stage=` and `workflow.*` configure the chain itself (e.g. `workflow.chain=[...]`); its stages lack them.
    `paths.root=` is the chain's root, which every step already gets first (a step may move under it: the
    paper_effects chain gives each model its own root, which a user's root must not flatten)."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key in ("stage", "paths.root") or key.startswith("workflow.")


def _adds_a_key(override: str) -> bool:
    """`+key=value` (Hydra's append), not `++key=value` (append or override)."""
    return override.startswith("+") and not override.startswith("++")


def _is_group_choice(override: str) -> bool:
    """`preset=full`, `model=...`: a config group choice, which every stage's config accepts."""
    key = override.split("=", 1)[0]
    return "." not in key and not key.startswith(("+", "~")) and os.path.isdir(os.path.join(CONF_DIR, key))


def _has_key(cfg: DictConfig, key: str) -> bool:
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True) is not _ABSENT
    except MissingMandatoryValue:  # a `???` value: the key exists and waits for this very override
        return True


def _form_for_step(override: str, base: DictConfig) -> str | None:
    """How one user override applies to a step whose config (without the user's overrides) is ``base``: as given;
    as `key=value` when it is a `+key=value` for a key this step already has (the `+` only got it past the chain's
    own config); or not at all (None) when this step has no such key."""
    if override.startswith("++") or _is_group_choice(override):
        return override
    if _has_key(base, override.split("=", 1)[0].lstrip("+~")):
        return override[1:] if _adds_a_key(override) else override
    return None


def applicable_overrides(stage: str, user_overrides: list[str], extra: list[str]) -> list[str]:
    """The user's overrides in the form that applies to this step, leaving out those for keys it lacks:
    `stage=demo +cache.num_actors=1` sets the cache steps' actors and leaves the training steps, which have no `cache`
    section, alone. :func:`run_chain` refuses an override that no step has, so a misspelt key is never dropped
    silently."""
    kept = [o for o in user_overrides if not _for_the_chain(o)]
    if all(o.startswith("++") or _is_group_choice(o) for o in kept):  # nothing to check against the step's keys
        return kept
    groups = [o for o in kept if _is_group_choice(o)]
    base = compose(config_name="config", overrides=[*extra, *groups, f"stage={stage}"])
    return [form for form in (_form_for_step(o, base) for o in kept) if form is not None]


def _compose(stage: str, extra: list[str], applied: list[str]) -> DictConfig:
    # The user's command line comes after the chain's per-step overrides, so it wins over them (as it wins over the
    # stage files): `stage=demo train.max_steps=2` trains every stage for 2 steps.
    return compose(config_name="config", overrides=[*extra, *applied, f"stage={stage}"])


def compose_stage_config(stage: str, user_overrides: list[str], extra: list[str]) -> DictConfig:
    return _compose(stage, extra, applicable_overrides(stage, user_overrides, extra))


def _flatten(overrides: list | None) -> list[str]:
    """A step's overrides with nested lists spliced in: steps share settings through a YAML anchor (`- *recipe`).
    An empty YAML entry (None) has none."""
    flat: list[str] = []
    for item in overrides or []:
        flat += _flatten(item) if isinstance(item, list) else [str(item)]
    return flat


def _section(cfg: DictConfig, key: str):
    """`workflow.<key>` as plain Python; None when it is absent or empty."""
    value = cfg.workflow.get(key)
    return None if value is None else OmegaConf.to_container(value, resolve=True)


def chain_steps(cfg: DictConfig, root: str) -> list[tuple[str, str, list[str]]]:
    """(step, the stage it runs, its own overrides: the chain's root, then `workflow.every_step`, then the step's own
    list) per chain step; what a step's config is composed from before the user's overrides (also for tools that
    rebuild it)."""
    per_stage = _section(cfg, "overrides") or {}
    aliases = _section(cfg, "aliases") or {}
    every_step = _flatten(_section(cfg, "every_step"))
    return [(step, str(aliases.get(step, step)), [f"paths.root={root}", *every_step, *_flatten(per_stage.get(step))])
            for step in cfg.workflow.chain]


def run_chain(cfg: DictConfig, ctx: StageContext, name: str) -> dict:
    from pipeline.dispatch import execute  # late: dispatch imports the registry, which names this module
    from pipeline.registry import get_stage

    user = list(ctx.extra.get("overrides", []))
    results: dict[str, dict] = {}
    steps = [(step, stage, extra, applicable_overrides(stage, user, extra))
             for step, stage, extra in chain_steps(cfg, ctx.root)]
    steps = _add_new_keys_everywhere(user, steps)
    _check_every_override_applies(user, steps, name)
    upstream = ""  # what the steps so far were made from: their configs and when each last ran
    for step, stage, extra, applied in steps:
        stage_cfg = _compose(stage, extra, applied)
        digest = chained_hash(upstream, config_hash(stage_cfg))
        marker = storage.join(ctx.root, "workflow", name, f"{step}.json")
        expected = get_stage(stage).expected_outputs(stage_cfg)
        done = _done_marker(marker, digest, expected)
        if done is not None:
            log.info("workflow %s: %s is complete, skipping", name, step)
            results[step] = {"skipped": True}
            finished_at = done["finished_at"]
        else:
            log.info("workflow %s: running %s", name, step if step == stage else f"{step} ({stage})")
            result = execute(stage, stage_cfg, overrides=[*applied, *extra], parent_run_id=ctx.run_id)
            finished_at = time.time()
            storage.write_json_atomic(marker, {"config_hash": digest, "finished_at": finished_at,
                                               "outputs": result.get("outputs", []), "result": result})
            results[step] = result
        upstream = f"{digest}@{finished_at}"
    return {"workflow": name, "stages": results}


def _used(user: list[str], steps: list[tuple]) -> set[str]:
    forms = {o for *_, applied in steps for o in applied}
    return {o for o in user if o in forms or (_adds_a_key(o) and o[1:] in forms)}


def _add_new_keys_everywhere(user: list[str], steps: list[tuple]) -> list[tuple]:
    """A `+key=value` that no step has is a real addition: every step gets it, as Hydra would add it."""
    used = _used(user, steps)
    new_keys = [o for o in user if _adds_a_key(o) and o not in used and not _for_the_chain(o)]
    return [(step, stage, extra, [*applied, *new_keys]) for step, stage, extra, applied in steps]


def _check_every_override_applies(user: list[str], steps: list[tuple], name: str) -> None:
    used = _used(user, steps)
    unused = [o for o in user if o not in used and not _for_the_chain(o)]
    if unused:
        raise ValueError(f"workflow {name}: no step of the chain has a key for {unused} (check the spelling; "
                         f"`+workflow.overrides.<step>=[...]` sets one step)")
    for step, _, _, applied in steps:
        left_out = [o for o in user if o not in _used(user, [(step, None, None, applied)]) and not _for_the_chain(o)]
        if left_out:
            log.info("workflow %s: %s has no key for %s; they apply to the other steps", name, step, left_out)


def run_demo(cfg: DictConfig, ctx: StageContext) -> dict:
    return run_chain(cfg, ctx, "demo")


def run_paper_effects(cfg: DictConfig, ctx: StageContext) -> dict:
    """The models that experiments/paper_effects.py measures (pipeline/conf/stage/paper_effects.yaml)."""
    return run_chain(cfg, ctx, "paper_effects")


class LearningCheckFailed(RuntimeError):
    """The short chain trained, but its model scores below a goal of `learning_check.goals`."""


def run_learning_check(cfg: DictConfig, ctx: StageContext) -> dict:
    """The `learning_check` chain, then its exported base's prompt-following scores held to `learning_check.goals`
    (pipeline/conf/stage/learning_check.yaml). Raises :class:`LearningCheckFailed` naming each missed goal."""
    from stages.evaluate.prompt_following import chance_key  # late, as the registry imports stages: CLI start-up

    result = run_chain(cfg, ctx, "learning_check")
    # The evaluate step's scores, also when a re-run skipped it: its completion marker keeps its result.
    marker = storage.read_json(storage.join(ctx.root, "workflow", "learning_check", "evaluate.json"))
    scores = marker["result"]["prompt_following"]
    goals = OmegaConf.to_container(cfg.learning_check.goals, resolve=True)
    verdict = check_goals(scores, goals)
    # Each held score beside its chance level and goal, flat, as the CLI's summary shows scores.
    result["learning_check"] = {"passed": verdict["passed"],
                                "goals": ", ".join(f"{name} >= {goal}" for name, goal in goals.items()),
                                **{name: c["value"] for name, c in verdict["checks"].items()},
                                **{chance_key(name): c["chance"] for name, c in verdict["checks"].items()}}
    log.info("learning check: %s", "; ".join(f"{name} {_number(c['value'])} (goal >= {c['goal']}, chance "
                                              f"{_number(c['chance'])})" for name, c in verdict["checks"].items()))
    if not verdict["passed"]:
        missed = [f"{name} {_number(c['value'])} < {c['goal']}" for name, c in verdict["checks"].items()
                  if not c["met"]]
        raise LearningCheckFailed(f"the short training run did not learn the demo data: {', '.join(missed)} "
                                  f"(grid: {scores.get('grid')})")
    return result


def _number(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def check_goals(scores: dict, goals: dict) -> dict:
    """Each goal's score, chance level and whether it is met; ``passed`` when all are. A goal naming a score the
    evaluation does not produce is a config error."""
    from stages.evaluate.prompt_following import chance_key

    checks = {}
    for name, goal in goals.items():
        if name not in scores:
            raise KeyError(f"learning_check.goals.{name}: the evaluation has no such score "
                           f"(it has {sorted(k for k in scores if k.endswith(('_accuracy', '_auc')))})")
        value = scores[name]
        chance = scores.get(chance_key(name))
        checks[name] = {"value": value, "goal": float(goal), "chance": chance,
                        "met": value is not None and float(value) >= float(goal)}
    return {"passed": all(c["met"] for c in checks.values()), "checks": checks}
