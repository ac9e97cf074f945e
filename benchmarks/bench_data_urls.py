"""URL list → bucketed shards: `stage=data` against img2dataset alone, same list, same local HTTP server, same
processes and threads.

A `python -m http.server` on 127.0.0.1 serves photo-like JPEGs (benchmarks/bench_data_tools.py); its CPU counts on
neither side. img2dataset downloads the list into WebDataset tars with `resize_mode="no"`,
`disable_all_reencoding=True` and its other defaults (EXIF extraction, sha256), `processes_count` processes of
`thread_count` threads. The pipeline runs `stage=data` on the list with that many reader tasks
(`ingest.concurrency`) of that many download threads (`ingest.download.threads`): it downloads, decode-checks,
hashes, buckets and shards every image, then writes the manifest, shard index and stats. Both cut the list into
work units of the same size. Each side is a fresh process; CPU is summed over all of its processes.

    python benchmarks/bench_data_urls.py                          # 3000 images, 1 process × 16 threads
    BENCH_URLS_IMAGES=200 python benchmarks/bench_data_urls.py    # a quick check
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks.bench_data_tools import PYTHON, TreeMeter, photo_folder, run_measured  # noqa: E402

GOAL_RATIO = 0.8
ABOUT = ("URL list → shards, same list on the same local HTTP server (127.0.0.1; its CPU counts on neither side), "
         "same processes × threads, same work-unit size. img2dataset: download into WebDataset tars, resize_mode=no, "
         "disable_all_reencoding=True, its default EXIF extraction and sha256. Pipeline: `stage=data` — download in "
         "its reader tasks, decode check, sha256, nearest bucket, one-bucket tars, manifest, rejects, shard index, "
         "stats, plots. Each side a fresh process, CPU summed over all its processes.")


def _serve(folder: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([PYTHON, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", folder],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port NNNNN (http://127.0.0.1:NNNNN/) ..."
    port = int(line.split(" port ")[1].split()[0])
    return proc, f"http://127.0.0.1:{port}"


def _url_list(folder: str, base_url: str, out: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*.jpg"))
    pq.write_table(pa.table({"url": [f"{base_url}/{rel}" for rel in images],
                             "caption": [f"a photograph, {rel}" for rel in images]}), out)
    return len(images)


def measured_img2dataset(url_list: str, out: str, processes: int, threads: int) -> dict[str, Any]:
    unit = int(os.environ.get("BENCH_URLS_UNIT", "500"))
    with TreeMeter() as meter:
        from img2dataset import download

        download(url_list=url_list, output_folder=out, input_format="parquet", url_col="url",
                 caption_col="caption", output_format="webdataset", resize_mode="no", disable_all_reencoding=True,
                 processes_count=processes, thread_count=threads, number_sample_per_shard=unit, timeout=10,
                 retries=0, enable_wandb=False, distributor="multiprocessing")
    import json

    stats = [json.loads(p.read_text()) for p in Path(out).glob("*_stats.json")]
    return {**meter.report(), "kept": sum(s.get("successes", 0) for s in stats)}


def main(images: int | None = None, processes: int | None = None, threads: int | None = None) -> dict:
    images = images or int(os.environ.get("BENCH_URLS_IMAGES", "3000"))
    processes = processes or int(os.environ.get("BENCH_URLS_PROCESSES", "1"))
    threads = threads or int(os.environ.get("BENCH_URLS_THREADS", "16"))
    unit = int(os.environ.get("BENCH_URLS_UNIT", "500"))
    with tempfile.TemporaryDirectory(prefix="bench_urls_") as tmp:
        generated = photo_folder(os.path.join(tmp, "photos"), images)
        server, base_url = _serve(os.path.join(tmp, "photos"))
        try:
            url_list = os.path.join(tmp, "urls.parquet")
            _url_list(os.path.join(tmp, "photos"), base_url, url_list)
            runs: dict[str, list[dict]] = {"img2dataset": [], "pipeline": []}
            for i in range(int(os.environ.get("BENCH_DATA_REPEATS", "2"))):  # alternating
                out = os.path.join(tmp, f"i2d{i}")
                runs["img2dataset"].append(run_measured(["img2dataset", url_list, out, str(processes),
                                                         str(threads)]))
                shutil.rmtree(out, ignore_errors=True)
                root = os.path.join(tmp, f"pipe{i}")
                runs["pipeline"].append(run_measured(["pipeline", url_list, root, str(processes),
                                                      f"ingest.download.threads={threads}",
                                                      f"ingest.chunk_size={unit}", "ingest.download.retries=0"]))
                shutil.rmtree(root, ignore_errors=True)
                time.sleep(1)
        finally:
            server.terminate()
            server.wait(timeout=30)
    best = {side: min(r["wall_s"] for r in rs) for side, rs in runs.items()}
    import statistics

    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s")} for side, rs in runs.items()}
    rate = {side: images / med[side]["wall_s"] for side in med}
    return {
        "about": ABOUT,
        "images": images, "mean_kb": generated["mean_kb"], "processes": processes, "threads": threads,
        "unit": unit, "img2dataset_samples_per_s": round(rate["img2dataset"], 1),
        "pipeline_samples_per_s": round(rate["pipeline"], 1),
        "ratio": round(rate["pipeline"] / rate["img2dataset"], 3),
        "img2dataset_cpu_ms_per_image": round(1000 * med["img2dataset"]["cpu_s"] / images, 2),
        "pipeline_cpu_ms_per_image": round(1000 * med["pipeline"]["cpu_s"] / images, 2),
        "cpu_ratio": round(med["pipeline"]["cpu_s"] / med["img2dataset"]["cpu_s"], 3),
        "best_wall_s": best,
        "kept": {side: [r["kept"] for r in rs] for side, rs in runs.items()},
        "goal_ratio": GOAL_RATIO, "meets_goal": rate["pipeline"] / rate["img2dataset"] >= GOAL_RATIO,
    }


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
