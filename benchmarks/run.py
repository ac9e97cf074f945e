"""Run every benchmark in one process and write benchmarks/RESULTS.md.

    python benchmarks/run.py                # all
    python benchmarks/run.py data sampler   # some (module names without the bench_ prefix); the others' figures
                                            # are kept from benchmarks/results.json, with the time they were taken
    python benchmarks/run.py demo           # the demo's step times and scores (reads a finished `make demo`)
    python benchmarks/run.py suite          # `make test` under a CPU meter (about half an hour on 2 cores)
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import sys
import time
import traceback

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

BENCHMARKS = ["data", "data_urls", "data_plan", "sampler", "train", "cache", "serve", "load", "serve_fault", "export",
              "scale_model", "demo", "suite"]


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def render(results: dict[str, dict], started: float) -> str:
    import torch

    lines = [
        "# Benchmark results",
        "",
        f"Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `python benchmarks/run.py` "
        f"(this run: {time.time() - started:.0f} s) on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}.",
        "Each ratio compares against a baseline measured in the same benchmark run; goals are the issues' targets.",
        "",
    ]
    for name, figures in results.items():
        lines += [f"## {name}", "", f"Measured {figures.get('measured_at', 'in this run')}.", ""]
        if "about" in figures:  # what each side of the comparison does
            lines += [figures["about"], ""]
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {key} | {_format(value)} |" for key, value in figures.items() if key != "about"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    chosen = argv or BENCHMARKS
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {BENCHMARKS}", file=sys.stderr)
        return 2
    started = time.time()
    here = os.path.dirname(os.path.abspath(__file__))
    saved = os.path.join(here, "results.json")
    results: dict[str, dict] = {}
    if os.path.exists(saved):
        with open(saved) as f:
            results = {k: v for k, v in json.load(f).items() if k in BENCHMARKS}
    failed = False
    for name in chosen:
        print(f"== benchmark {name}", flush=True)
        try:
            results[name] = importlib.import_module(f"benchmarks.bench_{name}").main()
            results[name]["measured_at"] = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        except Exception as err:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            failed = True
        print(json.dumps(results[name], indent=2, default=str), flush=True)
    results = {name: results[name] for name in BENCHMARKS if name in results}
    with open(saved + ".tmp", "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(saved + ".tmp", saved)
    report = render(results, started)
    out = os.path.join(here, "RESULTS.md")
    with open(out + ".tmp", "w") as f:
        f.write(report)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")
    from benchmarks.performance_table import README, update_readme

    if update_readme(results):
        print(f"wrote the performance table in {README}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
