"""Run the pipeline the way users do, in subprocesses: the CLI (`python pipeline/run.py stage=...`), its JSON summary,
and checks of what it wrote (tests/cluster/ray_head.py adds a private Ray head and `ray job submit`). Every wait is
bounded, and everything started here is stopped by process id, never by name.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

from tests.ports import free_port, free_ports  # noqa: F401 - re-exported for the cluster tests

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
RAY_CLI = str(VENV_BIN / "ray") if (VENV_BIN / "ray").exists() else shutil.which("ray") or "ray"
RUN_PY = "pipeline/run.py"

QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PYTHONUNBUFFERED": "1",
}
# The tiny preset on an embedded 2-CPU Ray, one actor per data stage: a data run fits beside its driver on 2 cores.
TINY_DATA = ["preset=tiny", "ray.num_cpus=2", "ingest.concurrency=1", "filter.concurrency=1",
             "buckets.concurrency=1"]


def child_env(extra: dict | None = None) -> dict:
    """This process's environment for a child: quiet, offline, the venv first on PATH, no inherited cluster."""
    env = {**os.environ, **QUIET_ENV}
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def make_demo_source(folder: Path, n: int, seed: int = 0) -> Path:
    """A small synthetic image folder (same-stem .txt captions), as `stage=demo_data` writes it."""
    from stages.data.demo_data import generate_demo_dataset

    generate_demo_dataset(str(folder), n=n, seed=seed, max_side=256, min_side=32, folder_size=max(n, 1))
    return folder


def demo_keys(folder: Path) -> set[str]:
    """The sample keys ingest derives from a folder source: relative image paths without extension."""
    images = {".png", ".jpg", ".jpeg", ".webp"}
    return {str(p.relative_to(folder).with_suffix("")).replace(os.sep, "/")
            for p in folder.rglob("*") if p.suffix.lower() in images}


# ---- processes ---------------------------------------------------------------------------------------------------


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError as err:
        return f"<no log at {path}: {err}>"


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.5,
             proc: subprocess.Popen | None = None, log_path: Path | None = None):
    """Poll ``condition`` until truthy (returns its value); fail naming ``what`` on timeout or when ``proc`` ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) while waiting for {what}\n"
                                 f"{log_tail(log_path) if log_path else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n"
                                 f"{log_tail(log_path) if log_path else ''}")
        time.sleep(interval_s)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until each process has exited or is a zombie; returns those still running after ``timeout_s``.

    (psutil.wait_procs waits for a killed grandchild until some ancestor reaps it, which is PID 1 once its parent
    is dead: measured 10-15 s per Ray head on this machine, for processes that were already dead.)
    """
    deadline = time.monotonic() + timeout_s
    alive = list(procs)
    while alive:
        alive = [p for p in alive if _running(p)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return alive


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGKILL a process and every process it started (an embedded Ray's raylet, workers, ...), by pid."""
    family = descendants(proc.pid)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    signal_all(family, signal.SIGKILL)
    wait_gone(family, timeout_s)
    proc.wait(timeout=timeout_s)


def stop_tree(proc: subprocess.Popen, sig: int = signal.SIGINT, grace_s: float = 30) -> int | None:
    """Ask a process to stop (``sig``), wait up to ``grace_s``, then SIGKILL what is left of it and its children."""
    family = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    family += [p for p in descendants(proc.pid) if p not in family]
    alive = [p for p in family if p.is_running()]
    signal_all(alive, signal.SIGKILL)
    wait_gone(alive, 15)
    if proc.poll() is None:
        kill_tree(proc)
    return proc.returncode


# ---- the CLI -----------------------------------------------------------------------------------------------------


@dataclass
class StageRun:
    returncode: int
    log: str
    summary: dict | None

    def check(self) -> dict:
        assert self.returncode == 0, f"stage failed (rc={self.returncode}):\n{self.log[-6000:]}"
        assert self.summary is not None, f"no JSON summary printed:\n{self.log[-4000:]}"
        return self.summary


def parse_summary(text: str) -> dict | None:
    """The JSON summary `pipeline/run.py` prints last (an object starting on a line of its own)."""
    decoder = json.JSONDecoder()
    lines = text.splitlines(keepends=True)
    offsets = [sum(len(x) for x in lines[:i]) for i in range(len(lines))]
    for i in reversed(range(len(lines))):
        if lines[i].rstrip() == "{":
            try:
                obj, _ = decoder.raw_decode(text[offsets[i]:])
            except ValueError:
                continue
            if isinstance(obj, dict) and "stage" in obj:
                return obj
    return None


def stage_command(stage: str, overrides: list[str]) -> list[str]:
    # --json: the full result on stdout (parse_summary reads it); no dashboard process beside the tests.
    return [PYTHON, RUN_PY, f"stage={stage}", "ray.include_dashboard=false", *overrides, "--json"]


def _seed_mlflow_store(overrides: list[str], env: dict) -> None:
    """The child's new MLflow store starts as the session's migrated template (tests/mlflow_template.py): under a
    local paths.root, or under a private HOME's ~/.cache for an object-store root. Never the user's own home."""
    from tests import mlflow_template

    settings = dict(o.split("=", 1) for o in overrides if "=" in o)
    if settings.get("mlflow.tracking_uri") or env.get("MLFLOW_TRACKING_URI") or "paths.root" not in settings:
        return
    root = settings["paths.root"]
    if "://" not in root:
        mlflow_template.seed(os.path.join(os.path.abspath(root), "mlflow.db"))
    elif env.get("HOME") and os.path.abspath(env["HOME"]) != os.path.abspath(os.path.expanduser("~")):
        mlflow_template.seed(os.path.join(env["HOME"], ".cache", "sdxl-pipeline", "mlflow.db"))


def start_stage(stage: str, overrides: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """`python pipeline/run.py stage=... overrides` in the background, stdout+stderr into ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = env or child_env()
    _seed_mlflow_store(overrides, env)
    with open(log_path, "ab") as log:
        return subprocess.Popen(stage_command(stage, overrides), cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def run_stage(stage: str, overrides: list[str], log_path: Path, env: dict | None = None,
              timeout_s: float = 300) -> StageRun:
    """Run a stage to the end (bounded); its return code, full log and JSON summary."""
    start = log_path.stat().st_size if log_path.exists() else 0
    proc = start_stage(stage, overrides, log_path, env)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"stage={stage} did not finish in {timeout_s}s\n{log_tail(log_path)}") from None
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = log_path.read_text(errors="replace")[start:]
    return StageRun(proc.returncode, text, parse_summary(text))


def mlflow_runs(tracking_uri: str, stage: str) -> list:
    """Runs of experiment `sdxl` tagged with ``stage``, newest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("sdxl")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.stage = '{stage}'",
                              order_by=["attributes.start_time DESC"])


def require_stage(name: str) -> None:
    """Skip (naming the stage) when the registry does not have ``name`` yet."""
    import pytest

    from pipeline.registry import STAGES

    if name not in STAGES:
        pytest.skip(f"stage {name!r} is not registered in pipeline/registry.py")


# ---- output checks -------------------------------------------------------------------------------------------------


def check_dataset(dataset_dir: str, input_keys: set[str]) -> dict:
    """The data contract on a finished dataset (local or s3://): every input key in exactly one of manifest or
    rejects, no duplicates, every manifest shard listed and readable. Returns the counts."""
    import tarfile
    import io

    from pipeline import storage

    manifest = storage.read_parquet(storage.join(dataset_dir, "manifest.parquet"), columns=["key", "shard"])
    rejects = storage.read_parquet(storage.join(dataset_dir, "rejects.parquet"), columns=["key", "stage", "reason"])
    kept, rejected = manifest.column("key").to_pylist(), rejects.column("key").to_pylist()
    assert len(kept) == len(set(kept)), "duplicate keys in manifest.parquet"
    assert len(rejected) == len(set(rejected)), "a key is rejected more than once"
    assert not set(kept) & set(rejected), f"keys both kept and rejected: {sorted(set(kept) & set(rejected))[:5]}"
    assert set(kept) | set(rejected) == input_keys, (
        f"lost: {sorted(input_keys - set(kept) - set(rejected))[:5]}, unknown: "
        f"{sorted((set(kept) | set(rejected)) - input_keys)[:5]}")
    shards = sorted(set(manifest.column("shard").to_pylist()))
    listed = set(storage.list_files(storage.join(dataset_dir, "shards"), suffix=".tar", recursive=True))
    members = 0
    for shard in shards:
        uri = storage.join(dataset_dir, *shard.split("/"))
        assert uri in listed, f"manifest names {shard}, not in the listing of {dataset_dir}/shards"
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri))) as tar:
            members += len(tar.getnames())
    stats = storage.read_json(storage.join(dataset_dir, "stats.json"))
    return {"kept": len(kept), "rejected": len(rejected), "shards": len(shards), "members": members, "stats": stats}


def check_parts_readable(stage_dir: str) -> int:
    """Every listed part of a data stage folder is a complete parquet file (no half-written object). Count."""
    from pipeline import storage

    parts = storage.list_files(stage_dir, suffix=".parquet")
    for uri in parts:
        storage.read_parquet(uri)  # raises on a truncated file
    return len(parts)


# ---- serving -------------------------------------------------------------------------------------------------------

# Small CPU shares so the five deployments fit beside the driver on a 2-CPU Ray.
SERVE_SMALL = ["serve.torch_threads=1", "serve.startup_timeout_s=300",
               *[f"serve.deployments.{name}.ray_actor_options.num_cpus=0.1"
                 for name in ("ingress", "text_encoder", "base", "refiner", "decoder")]]
SMALL_REQUEST = {"prompt": "a red circle on a blue background", "width": 32, "height": 32, "steps": 2, "seed": 0}


def http_status(url: str, body: dict | None = None, timeout_s: float = 60) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET (body None) or JSON POST; status 0 when the connection failed."""
    import urllib.error

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")
    except (OSError, http.client.HTTPException) as err:  # no (valid) answer: refused, reset, timed out
        return 0, str(err).encode(), ""


def start_serve(overrides: list[str], log_path: Path, env: dict | None = None,
                timeout_s: float = 360) -> tuple[subprocess.Popen, str]:
    """`stage=serve serve.blocking=true` on a free loopback port; waits (bounded) for GET /health → 200."""
    port = free_port()
    proc = start_stage("serve", ["preset=tiny", "serve.blocking=true", "serve.host=127.0.0.1", f"serve.port={port}",
                                 *SERVE_SMALL, *overrides], log_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_status(f"{url}/health", timeout_s=10)[0] == 200, timeout_s, f"{url}/health → 200",
                 interval_s=0.5, proc=proc, log_path=log_path)
    except BaseException:
        stop_tree(proc)
        raise
    return proc, url
