"""The data benchmarks' CPU meter counts the measured work, its children included, and not its own polling.

Each check runs in a fresh interpreter, as the benchmarks run their measured side (``run_measured``): the meter
counts the whole process tree, and pytest's own tree may still hold a Ray cluster an earlier test started."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]

_PRELUDE = textwrap.dedent("""
    import json, subprocess, sys, time
    from benchmarks.bench_data_tools import TreeMeter

    def spin(seconds):
        started = time.thread_time()
        while time.thread_time() - started < seconds:
            pass

    def own_cpu(meter):
        times = meter.me.cpu_times()
        return times.user + times.system
""")


def _run_fresh(body: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)], cwd=_REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_meter_counts_a_childs_cpu():
    result = _run_fresh("""
        child_code = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.4: pass\\n"
        with TreeMeter(interval_s=0.005) as meter:
            before = own_cpu(meter)
            child = subprocess.Popen([sys.executable, "-c", child_code])
            spin(0.6)
            child.wait()
        print(json.dumps({"measured": meter.report()["cpu_s"] - before}))
    """)
    # this process's 0.6 s and most of the child's 0.4 s (its last polled reading), its start-up a little more
    assert 0.6 + 0.3 <= result["measured"] <= 0.6 + 0.4 + 0.15, result


def test_the_meters_own_polling_is_left_out():
    result = _run_fresh("""
        with TreeMeter(interval_s=0.0005) as meter:  # the process does nothing but be polled, very often
            before = own_cpu(meter)
            time.sleep(1.0)
        report = meter.report()
        print(json.dumps({"meter_cpu_s": report["meter_cpu_s"], "counted": report["cpu_s"] - before}))
    """)
    assert result["meter_cpu_s"] > 0.05, result
    assert result["counted"] < 0.5 * result["meter_cpu_s"], result
