"""The entry point: `python pipeline/run.py stage=<name> [preset=tiny|full] [key=value ...] [--json]`.

Without a cluster address it starts an embedded local Ray; under `ray job submit` (or with RAY_ADDRESS) it joins
that cluster. Run with --help for the list of stages.

A stage ends with a short summary on stdout (what it produced, where, what to run next); the full result is written
to `<root>/results/<stage>.json`, and `--json` prints it on stdout instead of the summary. The log (every logger,
Ray Data's details included) goes to `<root>/logs/<stage>.log`. An error ends in one line on stderr and exit status
1; `HYDRA_FULL_ERROR=1` shows the whole traceback, as Hydra users expect.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

JSON_FLAG = "--json"
# What main() got to, for the error line: the stage and its log file.
_run_state: dict = {}
_options = {"json": False}


# An absolute path: Hydra then finds the configs whether this file runs as a script or is imported (tests).
@hydra.main(config_path=os.path.join(_REPO, "pipeline", "conf"), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from pipeline import console, logs
    from pipeline.context import result_uri
    from pipeline.dispatch import execute
    from pipeline.ray_env import current_session
    from pipeline.tracking import resolve_tracking_uri

    hydra_cfg = HydraConfig.get()
    stage = hydra_cfg.runtime.choices["stage"]
    root = str(cfg.paths.root)
    log_path = logs.open_run_log(logs.run_log_path(root, stage), shlex.join(["pipeline/run.py", *sys.argv[1:]]))
    _run_state.update(stage=stage, log=log_path)
    # With --json, stdout carries the JSON only: what stages print goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if _options["json"] else contextlib.nullcontext()
    try:
        with quiet:
            result = execute(stage, cfg, overrides=list(hydra_cfg.overrides.task))
    except Exception as exc:  # reported by cli(): Hydra would print its own header first
        _run_state["error"] = exc
        return
    if _options["json"]:
        print(json.dumps(result, indent=2, default=str), flush=True)
        return
    session = current_session()
    tracking = resolve_tracking_uri(cfg) if cfg.mlflow.get("enabled", True) else None
    print(console.summary_text(stage, result, result_uri=result_uri(root, stage), log_path=log_path,
                               tracking_uri=tracking, dashboard_url=session.dashboard_url if session else None,
                               dashboard_lives=bool(session and session.mode == "joined")), flush=True)


def cli(argv: list[str]) -> int:
    """Run the CLI with ``argv`` (without the program name); returns the exit status."""
    from pipeline.registry import help_text

    if any(arg in ("--help", "-h") for arg in argv):
        print(help_text())
        return 0
    _options["json"] = JSON_FLAG in argv
    _run_state.clear()
    sys.argv = [sys.argv[0], *[arg for arg in argv if arg != JSON_FLAG]]
    user_wants_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra re-raises instead of printing its own report; what the user sees is decided below.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
        if "error" in _run_state:
            raise _run_state["error"]
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if user_wants_trace:
            raise
        from pipeline import console, logs

        logs.record_failure(exc)
        print(console.error_line(exc, _run_state.get("stage"), _run_state.get("log")), file=sys.stderr, flush=True)
        return 1
    finally:
        if not user_wants_trace:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        from pipeline import logs

        logs.close_run_log()
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
