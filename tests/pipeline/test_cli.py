"""The CLI as a user meets it: a short summary and the full result in a file (``--json`` prints it), one line on
stderr and a non-zero exit for a bad value (the trace in the run's log file, or on screen with HYDRA_FULL_ERROR=1).

Most cases call ``pipeline.run.cli`` in this process; two start Python to check what a shell sees. None starts Ray.
"""

import json
import os
import subprocess
import sys

import pytest

from pipeline import storage
from pipeline.run import cli

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """cli(argv) in this process; (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["pipeline/run.py"])

    def _run(*argv: str) -> tuple[int, str, str]:
        status = cli(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return _run


def test_a_stage_ends_with_a_summary_and_writes_its_full_result(run_cli, tmp_path):
    root = tmp_path / "root"
    # (MLflow off: creating its database costs more than the stage; the `mlflow ui` line is in test_console.)
    status, out, _ = run_cli("stage=model_summary", f"paths.root={root}", "mlflow.enabled=false")
    assert status == 0
    result_file = root / "results" / "model_summary.json"
    saved = storage.read_json(str(result_file))
    assert saved["stage"] == "model_summary" and saved["parameters"]["unet_base"] > 0
    summary = out[out.index("✔ model_summary finished in"):].splitlines()
    assert summary[1:] == [f"  full result  {result_file}", f"  log          {root / 'logs' / 'model_summary.log'}"]
    assert '"parameters"' not in out  # the dict is in the file, not on screen
    assert "stage model_summary: root=" in (root / "logs" / "model_summary.log").read_text()

    # --json: stdout is the full result and nothing else (the stage's own table goes to stderr).
    status, out, err = run_cli("stage=model_summary", f"paths.root={root}", "mlflow.enabled=false", "--json")
    assert status == 0
    printed = json.loads(out)
    assert printed["parameters"] == saved["parameters"] and printed["stage"] == "model_summary"
    assert "base UNet" in err
    assert storage.read_json(str(result_file)) == printed


@pytest.mark.parametrize("args, line", [
    (["stage=nope"], "error: stage=nope does not exist; choose one of: buckets, cache_latents, caption, data, "),
    (["stage=data", "preset=huge"], "error: preset=huge does not exist; choose one of: full, tiny"),
    (["stage=model_summary", "model.nope=1"], "error: Could not override 'model.nope'. To append to your config use "
                                              "+model.nope=1"),
])
def test_a_bad_value_ends_in_one_line(run_cli, tmp_path, args, line):
    status, out, err = run_cli(*args, f"paths.root={tmp_path}")
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(line), err


def test_a_missing_checkpoint_is_one_line_and_its_trace_is_in_the_log(run_cli, tmp_path):
    status, _, err = run_cli("stage=export", f"paths.root={tmp_path}", "mlflow.enabled=false")
    assert status == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        errors[0]] and errors[0].startswith("error: stage=export failed: FileNotFoundError: export needs a finished base")
    assert errors[0].endswith(f"(full trace in {tmp_path / 'logs' / 'export.log'} or with HYDRA_FULL_ERROR=1)")
    assert "Traceback" not in err
    log_text = (tmp_path / "logs" / "export.log").read_text()
    assert "Traceback (most recent call last)" in log_text and "resolve_sources" in log_text


def _shell(args: list[str], full_error: bool = False) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run([sys.executable, "pipeline/run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_a_shell_sees_one_line_and_status_1_and_the_trace_on_request(tmp_path):
    # A missing ingest.source is found before Ray would start.
    args = ["stage=data", f"paths.root={tmp_path}"]
    proc = _shell(args)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: stage=data needs ingest.source=...: a folder of images with .txt captions, a URL list "
        "(.parquet/.csv/.jsonl) or a folder of .tar/.parquet shards"]
    full = _shell(args, full_error=True)
    assert full.returncode == 1
    assert "Traceback (most recent call last)" in full.stderr and "check_config" in full.stderr
    assert full.stderr.rstrip().endswith("needs ingest.source=...: a folder of images with .txt captions, a URL list "
                                         "(.parquet/.csv/.jsonl) or a folder of .tar/.parquet shards")
