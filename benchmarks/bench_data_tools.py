"""Shared pieces of the data benchmarks: photo-like test images, CPU over a process tree, fresh measured processes.

Every measured run is a fresh process (``python -m benchmarks.bench_data_tools <side> ...``) that reports JSON: wall
seconds, CPU seconds summed over itself and every process it started (Ray's raylet, GCS and workers, img2dataset's
pool), its own peak RSS, and how many of its processes had loaded torch (a mapped libtorch). Both sides of a
comparison run the same way, so interpreter start-up and imports count on both. The meter's own polling (psutil over
every process, four times a second: more processes on the pipeline's side) is left out of both sides' CPU.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

PYTHON = sys.executable
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
             "RAY_AUTH_MODE": "disabled", "PYTHONPATH": _REPO}


# --------------------------------------------------------------------------------------------- test images
def photo_folder(folder: str, n: int, seed: int = 0, min_side: int = 200, max_side: int = 1200) -> dict[str, Any]:
    """``n`` photo-like JPEGs (a smooth colour field plus sensor-like noise, quality 85: ~80 kB at 200-1200 px, about
    what LAION photos weigh), each with a same-stem caption, in sub-folders of 1000. Returns size figures."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 4.2, (max_side, max_side, 3)).astype(np.int16)
    total = 0
    for i in range(n):
        h = int(rng.integers(min_side, max_side + 1))
        w = int(rng.integers(max(min_side, h // 4 + 1), min(max_side, 4 * h) + 1))  # within App. I's aspect range
        field = rng.random((h // 24 + 2, w // 24 + 2, 3))
        base = np.asarray(Image.fromarray((field * 255).astype("uint8")).resize((w, h), Image.Resampling.BILINEAR),
                          dtype=np.int16)
        y, x = int(rng.integers(0, max_side - h + 1)), int(rng.integers(0, max_side - w + 1))
        buf = io.BytesIO()
        Image.fromarray((base + noise[y:y + h, x:x + w]).clip(0, 255).astype("uint8")).save(buf, "JPEG", quality=85)
        sub = Path(folder, f"{i // 1000:05d}")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:07d}.jpg").write_bytes(buf.getvalue())
        (sub / f"{i:07d}.txt").write_text(f"a photograph, number {i}")
        total += len(buf.getvalue())
    return {"images": n, "mean_kb": round(total / max(1, n) / 1000, 1)}


def subset_folder(source: str, target: str, n: int) -> str:
    """The first ``n`` images (and captions) of ``source`` as hard links under ``target``: no bytes copied."""
    done = 0
    for sub in sorted(Path(source).iterdir()):
        for image in sorted(sub.glob("*.jpg")):
            if done == n:
                return target
            out = Path(target, sub.name)
            out.mkdir(parents=True, exist_ok=True)
            for path in (image, image.with_suffix(".txt")):
                os.link(path, out / path.name)
            done += 1
    return target


# --------------------------------------------------------------------------------------------- measuring
class TreeMeter:
    """CPU seconds of this process and its descendants (polled, so workers that exit still count), peak RSS."""

    def __init__(self, interval_s: float = 0.25):
        import psutil

        self.psutil, self.me = psutil, psutil.Process()
        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.torch_pids: set[int] = set()
        self.meter_cpu_s = 0.0  # CPU of the sampling itself (it runs in the measured process), left out of cpu_s
        self._meter_cpu_in_me = 0.0  # ... as much of it as this process's last reading already held
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.started = time.perf_counter()

    def __enter__(self) -> "TreeMeter":
        self._thread.start()
        return self

    def sample(self, check_torch: bool = False) -> None:
        started = time.thread_time()  # this thread's CPU: the polling thread's or the caller's
        self._sample(check_torch, started)
        self.meter_cpu_s += time.thread_time() - started

    def _sample(self, check_torch: bool, started: float) -> None:
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                self.cpu[proc.pid] = times.user + times.system
                if proc.pid == self.me.pid:
                    self._meter_cpu_in_me = self.meter_cpu_s + time.thread_time() - started
                if proc.pid not in self.names:
                    self.names[proc.pid] = _title(proc)
                if check_torch and proc.pid not in self.torch_pids and any(
                        "libtorch" in m.path for m in proc.memory_maps()):
                    self.torch_pids.add(proc.pid)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()  # the torch check reads memory maps: only at the end, when every worker is still alive

    def __exit__(self, *exc) -> None:
        self.sample(check_torch=True)
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, Any]:
        by_name: dict[str, float] = {}
        cpu_of = {**self.cpu, self.me.pid: max(0.0, self.cpu.get(self.me.pid, 0.0) - self._meter_cpu_in_me)}
        for pid, cpu in cpu_of.items():  # where the CPU went: Ray's processes by their title, workers included
            by_name[self.names.get(pid, "?")] = round(by_name.get(self.names.get(pid, "?"), 0.0) + cpu, 2)
        return {"wall_s": round(time.perf_counter() - self.started, 3), "cpu_s": round(sum(cpu_of.values()), 3),
                "meter_cpu_s": round(self.meter_cpu_s, 3),
                "cpu_by_process": dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
                "processes": len(self.cpu), "processes_with_torch": len(self.torch_pids),
                "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "driver_imported_torch": "torch" in sys.modules}


def _title(proc) -> str:
    """A process's role: its Ray title (ray::...), else its script or module, else its executable's name."""
    cmd = proc.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split(" ")[0]
    for i, part in enumerate(cmd[1:], 1):
        if part == "-m" and i + 1 < len(cmd):
            return cmd[i + 1]
        if part.endswith(".py"):
            return os.path.basename(part)
    return proc.name()


def run_measured(args: list[str], timeout_s: float = 3600) -> dict[str, Any]:
    """Run ``python -m benchmarks.bench_data_tools ARGS`` in a fresh process; its JSON report."""
    out = subprocess.run([PYTHON, "-m", "benchmarks.bench_data_tools", *args], cwd=_REPO, capture_output=True,
                         text=True, timeout=timeout_s, env={**os.environ, **QUIET_ENV})
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"measured run {args[:1]} failed (rc={out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1])


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points."""
    import numpy as np

    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(intercept), float(slope)


def bytes_outside_shards(dataset_dir: str) -> tuple[int, int]:
    """(bytes of every file of the dataset folder that is not a shard tar, bytes of the shard tars)."""
    outside = shards = 0
    for folder, _, names in os.walk(dataset_dir):
        for name in names:
            size = os.path.getsize(os.path.join(folder, name))
            if name.endswith(".tar") and os.path.relpath(folder, dataset_dir).startswith("shards"):
                shards += size
            else:
                outside += size
    return outside, shards


# --------------------------------------------------------------------------------------------- measured sides
def _pipeline(source: str, root: str, workers: int, extra: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    with TreeMeter() as meter:
        import ray

        from pipeline.context import StageContext
        from stages.data import pipeline as data_pipeline

        conf = Path(_REPO, "pipeline", "conf")
        cfg = OmegaConf.create({s: OmegaConf.load(conf / s / "default.yaml")
                                for s in ("ingest", "filter", "caption", "buckets")})
        cfg.scoring = {"enabled": False}
        cfg.ingest.source, cfg.ingest.concurrency = source, workers
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(extra))
        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        result = data_pipeline.run(cfg, StageContext(root=root, stage="data", dataset="bench"))
        meter.sample(check_torch=True)  # Ray's workers are still alive here
        ray.shutdown()
    dataset = os.path.join(root, "data", "bench")
    outside, shard_bytes = bytes_outside_shards(dataset)
    return {**meter.report(), "kept": result["kept"], "rejected": result["rejected"],
            "bytes_outside_shards": outside, "shard_bytes": shard_bytes, "dataset_dir": dataset}


def main(argv: list[str]) -> None:
    side = argv[0]
    if side == "pipeline":
        source, root, workers = argv[1], argv[2], int(argv[3])
        report = _pipeline(source, root, workers, argv[4:])
    elif side == "baseline":
        from benchmarks.bench_data_baseline import measured_loop

        report = measured_loop(argv[1], argv[2])
    elif side == "img2dataset":
        from benchmarks.bench_data_urls import measured_img2dataset

        report = measured_img2dataset(argv[1], argv[2], int(argv[3]), int(argv[4]))
    elif side == "plan":
        from benchmarks.bench_data_plan import measured_plan

        report = measured_plan(argv[1], argv[2], int(argv[3]))
    else:
        raise SystemExit(f"unknown side {side!r}")
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
