"""The demo's figures: how long each step of `stage=demo` took and what the trained models score.

    python benchmarks/run.py demo     # runs `python pipeline/run.py stage=demo` under ./outputs (BENCH_DEMO_ROOT=DIR
                                      # for another root), then reports what the chain's step markers recorded

Steps that an earlier `make demo` left complete (same config) are skipped by the workflow, so after `make demo` this
reads that run's figures instead of training again; on a fresh root it runs the whole demo (about half an hour on
2 cores). Each step's seconds come from its own result; `steps_total_s` is their sum (the demo's time without the
install), `span_s` the time from the first step's start to the last step's end (larger when the run was interrupted
and resumed). Scores: the autoencoder's held-out PSNR (`evaluate_vae`) and the known-answer prompt-following accuracy
of the exported base in diffusers' StableDiffusionXLPipeline (`evaluate`), beside their chance levels and the goals
of issue 10.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

GOALS = {"vae_psnr_db": 25.0, "object_color_accuracy": 0.75, "background_accuracy": 0.9, "position_accuracy": 0.5,
         "steps_total_s": 15 * 60}


def demo_chain() -> list[str]:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(_REPO, "pipeline", "conf"), version_base=None):
        return [str(step) for step in compose(config_name="config", overrides=["stage=demo"]).workflow.chain]


def read_markers(root: str, chain: list[str]) -> dict[str, dict]:
    from pipeline import storage

    markers = {}
    for step in chain:
        uri = storage.join(root, "workflow", "demo", f"{step}.json")
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri} is missing: the demo under {root} did not finish")
        markers[step] = storage.read_json(uri)
    return markers


def figures(markers: dict[str, dict]) -> dict:
    seconds = {step: round(float(m["result"].get("seconds", 0.0)), 1) for step, m in markers.items()}
    first = min(markers, key=lambda s: markers[s]["finished_at"])
    started = markers[first]["finished_at"] - seconds[first]
    finished = max(m["finished_at"] for m in markers.values())
    score = markers["evaluate"]["result"]["prompt_following"]
    out = {
        "steps_total_s": round(sum(seconds.values()), 1),
        "span_s": round(finished - started, 1),
        "step_seconds": seconds,
        "finished_at": f"{datetime.datetime.fromtimestamp(finished, datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "vae_psnr_db": round(float(markers["evaluate_vae"]["result"]["metrics"]["vae_psnr"]), 2),
        "prompt_following_source": score["source"],
        "num_prompts": score["num_images"],
    }
    # Shape has no goal in issue 10 (it asks that the grid show the shapes): reported, absent from runs before the
    # reader read shapes.
    for name in ("object_color", "background", "position", "shape"):
        if score.get(f"{name}_accuracy") is not None:
            out[f"{name}_accuracy"] = round(float(score[f"{name}_accuracy"]), 3)
            out[f"{name}_chance"] = round(float(score[f"{name}_chance"]), 3)
    out["reader_on_real_images"] = {k: round(float(v), 3) for k, v in score["reader_on_real_images"].items()
                                    if k.endswith("_accuracy")}
    # How much worse the base denoises held-out images when the caption names a wrong value (0: the word is ignored);
    # absent from demo runs before the measure existed.
    use = score.get("conditioning_use")
    if use:
        out["conditioning_use"] = {name: {"gain": round(float(use[name]["gain"]), 3),
                                          "z": round(float(use[name]["z"]), 1)}
                                   for name in ("object_color", "background", "position", "shape") if name in use}
    # What the autoencoder lets through (the demo reader on its reconstructions): ceilings on the scores above.
    vae_metrics = markers["evaluate_vae"]["result"]["metrics"]
    out["vae_readback"] = {name: round(float(vae_metrics[f"vae_readback_{name}"]), 3)
                           for name in ("object_color", "background", "position", "shape")
                           if vae_metrics.get(f"vae_readback_{name}") is not None}
    out["goals"] = GOALS
    out["meets_goals"] = {k: (out[k] <= goal if k == "steps_total_s" else out[k] >= goal) for k, goal in GOALS.items()}
    return out


def main() -> dict:
    root = os.path.abspath(os.environ.get("BENCH_DEMO_ROOT", os.path.join(_REPO, "outputs")))
    subprocess.run([sys.executable, os.path.join(_REPO, "pipeline", "run.py"), "stage=demo", f"paths.root={root}"],
                   cwd=_REPO, check=True)
    return {"root": root, **figures(read_markers(root, demo_chain()))}


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
