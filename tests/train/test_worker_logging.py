"""Rank 0's console progress during a training stage (stages/train/worker_logging.py)."""

from __future__ import annotations

import logging

from stages.train.worker_logging import Progress, progress_line


def test_progress_line_says_where_the_stage_is_and_how_long_is_left():
    line = progress_line("pretrain256", 400, 1200, 0.01213, 0.33)
    assert line == "pretrain256 step 400/1200 (33%) · loss 0.01213 · 0.33 s/step · 4 min 24 s left"
    assert progress_line("pretrain256", 1200, 1200, 0.0116, 0.3).endswith("0.30 s/step · done")


def test_progress_prints_at_most_every_interval_and_always_at_the_last_step(caplog):
    now = [0.0]
    progress = Progress("train_vae", max_steps=100, every_s=30, clock=lambda: now[0])
    printed = []
    with caplog.at_level(logging.INFO, logger="stages.train.worker_logging"):
        for step, t in ((10, 10.0), (20, 29.0), (30, 31.0), (40, 45.0), (50, 70.0), (100, 75.0)):
            now[0] = t
            printed.append(progress.update(step, loss=0.5, step_time_s=1.0) is not None)
    assert printed == [False, False, True, False, True, True]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["train_vae step 30/100 (30%) · loss 0.5 · 1.00 s/step · 1 min 10 s left",
                     "train_vae step 50/100 (50%) · loss 0.5 · 1.00 s/step · 50.0 s left",
                     "train_vae step 100/100 (100%) · loss 0.5 · 1.00 s/step · done"]


def test_ray_trains_report_lines_follow_its_log_level():
    import ray.train.v2._internal.execution.context as train_context

    from stages.train.worker_logging import quiet_ray_train_reports

    reports = logging.getLogger(train_context.__file__)
    assert train_context.logger is reports  # where Ray 2.60 logs each report; a Ray that moves it fails here
    before = reports.level
    try:
        quiet_ray_train_reports("warning")
        assert not reports.isEnabledFor(logging.INFO) and reports.isEnabledFor(logging.WARNING)
        quiet_ray_train_reports("INFO")
        assert reports.isEnabledFor(logging.INFO)
    finally:
        reports.setLevel(before)
