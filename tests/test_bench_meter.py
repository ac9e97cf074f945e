"""The data benchmarks' CPU meter counts the measured work, its children included, and not its own polling."""

import subprocess
import sys
import time

from benchmarks.bench_data_tools import TreeMeter


def _spin(seconds: float) -> None:
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass


def _own_cpu(meter: TreeMeter) -> float:
    times = meter.me.cpu_times()
    return times.user + times.system


def test_the_meter_counts_a_childs_cpu():
    child_code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
    with TreeMeter(interval_s=0.005) as meter:
        before = _own_cpu(meter)
        child = subprocess.Popen([sys.executable, "-c", child_code])
        _spin(0.6)
        child.wait()
    measured = meter.report()["cpu_s"] - before
    # this process's 0.6 s and most of the child's 0.4 s (its last polled reading), its start-up a little more
    assert 0.6 + 0.3 <= measured <= 0.6 + 0.4 + 0.15


def test_the_meters_own_polling_is_left_out():
    with TreeMeter(interval_s=0.0005) as meter:  # the process does nothing but be polled, very often
        before = _own_cpu(meter)
        time.sleep(1.0)
    report = meter.report()
    assert report["meter_cpu_s"] > 0.05
    assert report["cpu_s"] - before < 0.5 * report["meter_cpu_s"], report
