"""What the CLI shows: the stage summary (generic over result keys), the one-line error, Ray Data's console output
trimmed to one progress line per dataset, and the dashboard that falls back without failing the run."""

import io
import logging
import os

import pytest
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import OmegaConf

from pipeline import console, logs, ray_env
from pipeline.registry import ConfigError, get_stage

TRAIN = {"stage": "train_vae", "step": 20, "samples": 2000, "seconds": 42.69,
         "final_dir": "/r/runs/train_vae/final", "checkpoint": "/r/runs/train_vae/checkpoint_000000020",
         "dataset_dir": "/r/data/default",
         "metrics": {"loss": 0.5624, "loss/loss": 0.56240001, "loss/psnr": 9.9566, "loss/kl": 0.0016, "lr": 3e-6}}
EVALUATE = {"stage": "evaluate", "seconds": 12.0, "output_dir": "/r/runs/evaluate/ema",
            "rows": [{"fid": 301.0, "clip_score": 20.1}],
            "metrics": {"fid_cfg1.5": 312.44, "fid_cfg5": 298.1, "clip_score_cfg1.5": 20.12, "clip_score_cfg5": 21.0},
            "files": {"fid_vs_clip.png": "/r/runs/evaluate/ema/fid_vs_clip.png",
                      "results.md": "/r/runs/evaluate/ema/results.md"},
            "prompt_following": {"object_accuracy": 0.625, "object_chance": 0.25,
                                 "position": {"accuracy": 0.5, "chance": 0.2},
                                 "reader_on_real_images": {"object_accuracy": 1.0, "object_chance": 0.25},
                                 "grid": "/r/runs/evaluate/ema/prompt_following.png"}}
GENERATE = {"stage": "generate", "images": 4, "grid": "/r/generated/grid.png", "seconds": 30.5,
            "outputs": ["/r/generated/grid.png", "/r/generated/000_0.png", "/r/generated/001_0.png"]}


def test_a_stage_summary_shows_counts_metrics_outputs_and_next_commands():
    text = console.summary_text("train_vae", TRAIN, result_uri="/r/results/train_vae.json", log_path="/r/logs/x.log",
                                tracking_uri="sqlite:////r/mlflow.db", dashboard_url="http://127.0.0.1:8265")
    lines = text.splitlines()
    assert "✔ train_vae finished in 42.7 s" in lines
    assert "  samples 2,000 · step 20 · loss 0.562 · psnr 9.96" in lines  # loss/loss shown once; kl, lr not
    assert "  final        /r/runs/train_vae/final" in lines
    assert "  full result  /r/results/train_vae.json" in lines
    assert lines[-2:] == ["next:", "  mlflow ui --backend-store-uri sqlite:////r/mlflow.db"]
    # An embedded dashboard ends with the command: it is not a next step.
    assert "8265" not in text
    joined = console.summary_text("train_vae", TRAIN, dashboard_url="http://head:8265", dashboard_lives=True)
    assert joined.splitlines()[-1] == "  Ray dashboard: http://head:8265"


def test_metrics_are_found_wherever_a_stage_puts_them():
    head = console.headline(EVALUATE)
    metrics = dict(head.metrics)
    # Accuracies first, each beside its chance level, under nested or flat keys.
    assert head.metrics[0] == ("object_accuracy", "0.625 (chance 0.25)")
    assert metrics["position_accuracy"] == "0.5 (chance 0.2)"
    # The same accuracy of something else is named by what it measured, not shown as a second object_accuracy.
    assert metrics["reader_on_real_images/object_accuracy"] == "1 (chance 0.25)"
    # Values over guidance scales are grouped; lists (rows) repeat the dicts and are not read.
    assert metrics["fid (cfg 1.5/5)"] == "312/298"
    assert metrics["clip_score (cfg 1.5/5)"] == "20.1/21"
    assert "fid" not in metrics
    # An AUC is shown beside its chance level too.
    auc = console.headline({"learning_check": {"passed": True, "background_lightness_auc": 0.966,
                                               "background_lightness_chance": 0.5}})
    assert auc.metrics == [("background_lightness_auc", "0.966 (chance 0.5)")]
    paths = [path for _, path in head.paths]
    assert paths[0] == "/r/runs/evaluate/ema"
    assert "/r/runs/evaluate/ema/fid_vs_clip.png" in paths and "/r/runs/evaluate/ema/results.md" not in paths


def test_a_workflow_summary_has_a_few_lines_per_stage():
    result = {"workflow": "demo", "stage": "demo", "seconds": 612.0,
              "stages": {"demo_data": {"skipped": True}, "train_vae": TRAIN, "evaluate": EVALUATE,
                         "generate": GENERATE}}
    text = console.summary_text("demo", result, tracking_uri="sqlite:////r/mlflow.db")
    lines = text.splitlines()
    assert "✔ demo finished in 10 min 12 s (4 stages, 1 skipped as complete)" in lines
    assert "  demo_data  skipped: its outputs are complete for this config" in lines
    assert "  generate   images 4 · 30.5 s" in lines
    assert "             grid  /r/generated/grid.png" in lines  # its main output; not every image
    # A sub-stage shows its main output and the image to look at (under a `grid` key, however deep).
    assert "             prompt_following  /r/runs/evaluate/ema/prompt_following.png" in lines
    assert any("object_accuracy 0.625 (chance 0.25)" in ln for ln in lines if ln.startswith("  evaluate"))
    assert lines[-1] == "  open /r/generated/grid.png"
    # A few lines per stage, not the whole result.
    assert len(lines) < 25


def test_errors_are_one_line():
    options = ["full", "tiny"]
    missing = MissingConfigException("In 'config': Could not find 'preset/huge'\n\nAvailable options...",
                                     "preset/huge", options)
    assert console.error_line(missing) == "error: preset=huge does not exist; choose one of: full, tiny"
    bad = OverrideParseException("foo=[", "no viable alternative at input '['\nSee https://hydra.cc for details")
    assert console.error_line(bad) == "error: cannot parse the override 'foo=[': no viable alternative at input '['"
    with pytest.raises(ConfigError) as raised:
        get_stage("data").check_config(OmegaConf.create({"ingest": {"source": None}}))
    assert console.error_line(raised.value, "data", "/r/logs/data.log").startswith(
        "error: stage=data needs ingest.source=...: a folder of images")

    class UserCodeException(Exception):  # Ray Data's wrapper around an exception raised in a stage's function
        pass

    try:
        try:
            raise FileNotFoundError("no checkpoint at /r/runs/x\n(more detail)")
        except FileNotFoundError as inner:
            raise UserCodeException("wrapped") from inner
    except UserCodeException as exc:
        wrapped = exc
    line = console.error_line(wrapped, "export", "/r/logs/export.log")
    assert line == ("error: stage=export failed: FileNotFoundError: no checkpoint at /r/runs/x  "
                    "(full trace in /r/logs/export.log or with HYDRA_FULL_ERROR=1)")
    wrapped.failed_stage = "export"  # pipeline.dispatch marks the stage that raised; a chain says which one
    assert console.error_line(wrapped, "demo").startswith("error: stage=demo failed in export: FileNotFoundError")


def _record(message: str, level: int = logging.INFO, name: str = "ray.data._internal.progress.logging_progress"):
    return logging.makeLogRecord({"msg": message, "levelno": level, "levelname": logging.getLevelName(level),
                                  "name": name})


def test_ray_data_console_keeps_one_progress_line_per_dataset():
    stream = io.StringIO()
    handler = logs.RayDataConsoleHandler(stream=stream, interval_s=3600, tty=False)
    logs.set_progress_label("data")
    block = ["======= Running Dataset: dataset_0356dggck0l65G7owBevlm_0 =======", "Total Progress: 10/50",
             "Active & requested resources: 0/2 CPU, 0.0B/3.0GiB object store", "=" * 40]
    for message in ["Starting execution of Dataset dataset_0356dggck0l65G7owBevlm_0. Full logs are in /tmp/x",
                    "Execution plan of Dataset dataset_0356dggck0l65G7owBevlm_0: Input -> MapBatches(f)",
                    *block, *block]:  # the second block is inside the interval: not shown
        handler.emit(_record(message))
    handler.emit(_record("Progress bars for operators disabled. To enable, set ...", logging.WARNING))
    handler.emit(_record("Dataset dataset_0356dggck0l65G7owBevlm_0 execution finished in 6.98 seconds"))
    handler.emit(_record("a real problem", logging.WARNING))
    shown = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert shown == ["data: 10/50 rows", "data: finished in 6.98 seconds", "a real problem"]
    # On a terminal Ray draws the bar, which stays on screen when it finishes.
    tty = logs.RayDataConsoleHandler(stream=io.StringIO(), tty=True)
    assert tty.console_message(_record("Dataset ingest_0356dggck0l65G7owBevlm_0 execution finished in 1 seconds")) \
        is None
    assert logs.dataset_name("ingest_0356dggck0l65G7owBevlm_0") == "ingest"
    assert logs.dataset_name("dataset_0356dggck0l65G7owBevlm_0") is None


class _FakeRay:
    """ray.init's contract as _connect uses it: a dashboard that fails to start raises."""

    def __init__(self, dashboard_error: Exception | None):
        self.calls, self.dashboard_error, self.initialized = [], dashboard_error, False

    def init(self, **kwargs):
        self.calls.append(kwargs)
        self.initialized = True
        if kwargs.get("include_dashboard") and self.dashboard_error:
            raise self.dashboard_error

        class Context:
            dashboard_url = "127.0.0.1:8265" if kwargs.get("include_dashboard") else ""

        return Context()

    def is_initialized(self):
        return self.initialized

    def shutdown(self):
        self.initialized = False


def test_dashboard_starts_for_long_stages_and_falls_back_in_one_line(caplog):
    cfg = {"include_dashboard": "auto", "dashboard_host": "127.0.0.1"}
    ray = _FakeRay(None)
    assert ray_env._connect(ray, cfg, long_stage=True) == ray_env.RaySession("embedded", "http://127.0.0.1:8265")
    assert ray.calls[0]["include_dashboard"] is True and ray.calls[0]["dashboard_host"] == "127.0.0.1"
    assert ray_env._connect(_FakeRay(None), cfg, long_stage=False).dashboard_url is None
    assert ray_env._connect(_FakeRay(None), {**cfg, "include_dashboard": False}, long_stage=True).dashboard_url is None

    broken = _FakeRay(Exception("Cannot include dashboard with missing packages.\nmore lines"))
    with caplog.at_level(logging.WARNING, logger="pipeline.ray_env"):
        session = ray_env._connect(broken, cfg, long_stage=True)
    assert session == ray_env.RaySession("embedded", None)
    assert [call["include_dashboard"] for call in broken.calls] == [True, False]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["Ray could not start with its dashboard (Cannot include dashboard with missing packages.); "
                        "starting it without the dashboard"]
    with pytest.raises(ValueError, match="auto, true or false"):
        ray_env.want_dashboard("sometimes", True)


def test_embedded_ray_polls_training_workers_as_configured_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv(ray_env.TRAIN_POLL_ENV, raising=False)
    ray_env._connect(_FakeRay(None), {"include_dashboard": False, "train_poll_interval_s": 0.25}, long_stage=True)
    assert os.environ[ray_env.TRAIN_POLL_ENV] == "0.25"  # set before ray.init, so the controller inherits it
    monkeypatch.setenv(ray_env.TRAIN_POLL_ENV, "1.5")
    ray_env._connect(_FakeRay(None), {"include_dashboard": False, "train_poll_interval_s": 0.25}, long_stage=True)
    assert os.environ[ray_env.TRAIN_POLL_ENV] == "1.5"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # joining a cluster leaves its setting alone
    monkeypatch.delenv(ray_env.TRAIN_POLL_ENV)
    ray_env._connect(_FakeRay(None), {"train_poll_interval_s": 0.25}, long_stage=True)
    assert ray_env.TRAIN_POLL_ENV not in os.environ


def test_ray_data_is_set_to_one_bar_per_dataset_with_its_details_in_the_run_log(tmp_path):
    import ray.data

    path = logs.open_run_log(logs.run_log_path(str(tmp_path), "data"), "pipeline/run.py stage=data")
    try:
        logs.configure_ray_data_output(progress_interval_s=5)
        context = ray.data.DataContext.get_current()
        assert context.enable_progress_bars and not context.enable_operator_progress_bars
        assert not context.execution_options.verbose_progress
        data_logger = logging.getLogger("ray.data")
        consoles = [h for h in data_logger.handlers if h.get_name() == "console"]
        assert len(consoles) == 1 and isinstance(consoles[0], logs.RayDataConsoleHandler)
        assert consoles[0].interval_s == 5
        logging.getLogger("ray.data._internal.execution.streaming_executor").info("Execution plan of Dataset x: y")
    finally:
        logs.close_run_log()
    assert path == str(tmp_path / "logs" / "data.log")
    text = open(path).read()
    assert "pipeline/run.py stage=data" in text and "Execution plan of Dataset x: y" in text
    assert not [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.FileHandler)]
