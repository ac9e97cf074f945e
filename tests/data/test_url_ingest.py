"""URL lists, downloaded inside the streaming pass's reader tasks, against local HTTP servers (a fast host and a slow
host): successes reach the shards, 404s / timeouts / an HTML page the rejects, each with its reason."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.data import pipeline as data_pipeline
from stages.data import records
from tests.data import data_cfg

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TIMEOUT_S = 1.0          # the download timeout the tests configure
TOO_SLOW_S = 4.0         # /slow.jpg answers after this: a timeout
SLOW_HOST_DELAY_S = 0.3  # every answer of the slow host waits this long: slow, but within the timeout


def jpeg(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


IMAGES = {"/img/a.jpg": jpeg(64, 96, 1), "/img/b.jpg": jpeg(300, 100, 2), "/img/c.jpg": jpeg(50, 50, 3),
          **{f"/img/s{i}.jpg": jpeg(40 + i, 60, 10 + i) for i in range(6)}}


def handler(delay_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            time.sleep(delay_s)
            if self.path in IMAGES:
                body, ctype = IMAGES[self.path], "image/jpeg"
            elif self.path == "/page.html":
                body, ctype = b"<!DOCTYPE html><html><body>a web page, not a picture</body></html>", "text/html"
            elif self.path == "/slow.jpg":
                time.sleep(TOO_SLOW_S)
                body, ctype = IMAGES["/img/a.jpg"], "image/jpeg"
            else:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout case)
                pass

        def log_message(self, *args):  # keep test output quiet
            return

    return Handler


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) in this process; ``url`` while running."""

    def __init__(self, delay_s: float = 0.0):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler(delay_s))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hosts():
    with ImageServer() as fast, ImageServer(SLOW_HOST_DELAY_S) as slow:
        yield fast.url, slow.url


def url_entries(fast: str, slow: str) -> list[tuple[str, str]]:
    """(url, caption): 3 + 6 images, two 404s, a timeout and an HTML page."""
    return [(fast + "/img/a.jpg", "first"), (fast + "/img/b.jpg", "second"), (fast + "/img/c.jpg", "third"),
            (fast + "/missing.jpg", "gone"), (fast + "/also-missing.png", "gone too"), (fast + "/slow.jpg", "too slow"),
            (fast + "/page.html", "a web page"), *[(slow + f"/img/s{i}.jpg", f"slow {i}") for i in range(6)]]


def write_url_list(path: Path, entries: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"url": url, "caption": cap, "license": "cc-by"}) + "\n"
                            for url, cap in entries))
    return path


def check_url_dataset(dataset_dir: Path, entries: list[tuple[str, str]], fast: str) -> dict:
    manifest = records.read_dataset(str(dataset_dir / "manifest.parquet"), records.MANIFEST_SCHEMA).to_pylist()
    rejects = records.read_dataset(str(dataset_dir / "rejects.parquet"), records.REJECT_SCHEMA).to_pylist()
    by_caption = {r["caption"]: r for r in manifest}
    assert set(by_caption) == {"first", "second", "third", *[f"slow {i}" for i in range(6)]}
    assert (by_caption["second"]["orig_h"], by_caption["second"]["orig_w"]) == (300, 100)
    meta = json.loads(by_caption["first"]["meta_json"])["columns"]
    assert meta["license"] == "cc-by" and meta["url"] == fast + "/img/a.jpg"
    assert len(rejects) == 4 and len(manifest) + len(rejects) == len(entries)
    reasons = [(r["stage"], r["reason"]) for r in rejects]
    assert reasons.count(("ingest", "download_failed")) == 3 and reasons.count(("filter", "not_an_image")) == 1
    details = " ".join(r["detail"] for r in rejects if r["reason"] == "download_failed")
    assert "404" in details and "timed out" in details.lower()
    assert all((dataset_dir / r["shard"]).is_file() for r in manifest)
    assert sorted(r["key"] for r in manifest + rejects) == [f"{i:09d}" for i in range(len(entries))]
    return json.loads((dataset_dir / "stats.json").read_text())


def test_url_list_downloads_in_the_pass_to_shards_and_rejects(ray_local, hosts, tmp_path):
    from pipeline.context import StageContext

    fast, slow = hosts
    entries = url_entries(fast, slow)
    url_list = write_url_list(tmp_path / "urls.jsonl", entries)
    ctx = StageContext(root=str(tmp_path / "root"), stage="data", dataset="urls")
    cfg = data_cfg(**{"ingest.source": str(url_list), "ingest.chunk_size": 4, "ingest.download.timeout_s": TIMEOUT_S,
                      "ingest.download.retries": 0, "ingest.download.threads": 4})
    data_pipeline.run(cfg, ctx)
    stats = check_url_dataset(Path(ctx.dataset_dir), entries, fast)
    assert stats["accounting"]["ok"] and stats["units"] == 4
    assert not (Path(ctx.dataset_dir) / "download").exists()  # nothing written before the shards
