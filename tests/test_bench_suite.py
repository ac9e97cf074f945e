"""benchmarks/bench_suite.py: the suite's wall time, the machine's busy CPU over it, and pytest's own figures."""

from __future__ import annotations

import os
import sys

import pytest

from benchmarks import bench_suite, performance_table

PYTEST_TAIL = """\
============================= slowest 25 durations =============================
373.75s call     tests/train/test_learning_check.py::test_a_short_run_through_the_real_stages_learns_the_demo_data
216.70s setup    tests/train/test_stage_chain.py::test_every_stage_logs_params_metrics_grid_and_a_model_version
0.50s teardown tests/serve/test_app_http.py::test_health
=========== 1 failed, 719 passed, 2 skipped, 84 deselected in 1910.19s (0:31:50) ===========
"""


def test_busy_jiffies_leave_out_idle_and_iowait():
    stat = "cpu  100 20 30 1000 50 1 2 3 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
    assert bench_suite.cpu_jiffies(stat) == (100 + 20 + 30 + 1 + 2 + 3, 100 + 20 + 30 + 1000 + 50 + 1 + 2 + 3)


def test_pytest_summary_and_durations_are_read():
    out = bench_suite.parse_pytest("collected 806 items\n...\n" + PYTEST_TAIL)
    assert out["pytest_seconds"] == 1910.19
    assert (out["passed"], out["failed"], out["skipped"], out["deselected"]) == (719, 1, 2, 84)
    assert out["slowest"][0] == [373.8, "call", "tests/train/test_learning_check.py::"
                                 "test_a_short_run_through_the_real_stages_learns_the_demo_data"]
    assert len(out["slowest"]) == 3 and out["slowest_total_s"] == round(373.75 + 216.70 + 0.50, 1)
    assert bench_suite.parse_pytest("no pytest here") == {}


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_a_command_that_computes_is_measured_as_busy(tmp_path):
    # Half a second of pure-Python work in a child process, then a pytest-like summary line.
    code = ("import time; t = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
            "print('==== 3 passed in 0.50s ====')")
    out = bench_suite.run_measured(f"{sys.executable} -c \"{code}\"", str(tmp_path / "log.txt"))
    assert out["returncode"] == 0 and out["passed"] == 3 and out["pytest_seconds"] == 0.5
    assert out["wall_s"] >= 0.5
    assert out["cpu_busy_s"] >= 0.4  # the child's CPU is seen although it is not this process's
    assert out["cpu_floor_s"] == pytest.approx(out["cpu_busy_s"] / out["cores"], abs=0.1)
    assert 0 < out["busy_share"] <= 1
    assert "3 passed" in (tmp_path / "log.txt").read_text()


def test_the_readme_row_shows_wall_and_floor():
    results = {"suite": {"wall_s": 1910.2, "passed": 721, "cpu_floor_s": 1260.0, "busy_share": 0.66,
                         "measured_at": "2026-12-02 17:00 UTC"}}
    row = next(line for line in performance_table.table(results).splitlines() if line.startswith("| `suite`"))
    assert "**31.8 min** (721 passed); CPU floor 21.0 min (66% busy)" in row and "≤ 15 min" in row


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_a_failing_command_fails_the_benchmark_and_still_prints_its_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_suite, "machine_step_s", lambda: 0.1)
    monkeypatch.setattr(bench_suite, "_REPO", str(tmp_path))
    monkeypatch.setenv("BENCH_SUITE_CMD", f"{sys.executable} -c \"print('== 1 failed, 2 passed in 0.1s =='); exit(1)\"")
    with pytest.raises(RuntimeError, match="exited 1"):
        bench_suite.main()
    err = capsys.readouterr().err
    assert '"failed": 1' in err and '"passed": 2' in err and '"cpu_floor_s"' in err
