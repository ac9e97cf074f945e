"""URL lists through img2dataset against a local HTTP server: successes reach the shards, failures the rejects."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.data import pipeline as data_pipeline
from tests.data import data_cfg

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SLOW_SECONDS = 4.0  # the server sleeps this long; the download timeout is 1 s


def _jpeg(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


IMAGES = {"/img/a.jpg": _jpeg(64, 96, 1), "/img/b.jpg": _jpeg(300, 100, 2), "/img/c.jpg": _jpeg(50, 50, 3)}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path in IMAGES:
            body, ctype = IMAGES[self.path], "image/jpeg"
        elif self.path == "/page.html":
            body, ctype = b"<!DOCTYPE html><html><body>a web page, not a picture</body></html>", "text/html"
        elif self.path == "/slow.jpg":
            time.sleep(SLOW_SECONDS)
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


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_list_download_to_shards_and_rejects(ray_local, http_server, tmp_path):
    from pipeline.context import StageContext

    entries = [("/img/a.jpg", "first"), ("/img/b.jpg", "second"), ("/img/c.jpg", "third"),
               ("/missing.jpg", "gone"), ("/also-missing.png", "gone too"), ("/slow.jpg", "too slow"),
               ("/page.html", "a web page")]
    url_list = tmp_path / "urls.jsonl"
    url_list.write_text("".join(json.dumps({"url": http_server + path, "caption": cap, "license": "cc-by"}) + "\n"
                                for path, cap in entries))
    ctx = StageContext(root=str(tmp_path / "root"), stage="data", dataset="urls")
    cfg = data_cfg(**{"ingest.source": str(url_list), "ingest.download.timeout_s": 1,
                      "ingest.download.retries": 0, "ingest.download.threads": 4})
    data_pipeline.run(cfg, ctx)

    out = Path(ctx.dataset_dir)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    by_caption = {r["caption"]: r for r in manifest}
    assert set(by_caption) == {"first", "second", "third"}
    assert (by_caption["second"]["orig_h"], by_caption["second"]["orig_w"]) == (300, 100)
    meta = json.loads(by_caption["first"]["meta_json"])["columns"]
    assert meta["license"] == "cc-by" and meta["url"] == http_server + "/img/a.jpg"
    assert len(rejects) == 4 and len(manifest) + len(rejects) == len(entries)
    reasons = [(r["stage"], r["reason"]) for r in rejects]
    assert reasons.count(("ingest", "download_failed")) == 3 and reasons.count(("filter", "not_an_image")) == 1
    details = " ".join(r["detail"] for r in rejects if r["reason"] == "download_failed")
    assert "404" in details and "timed out" in details.lower()
    assert all((out / r["shard"]).is_file() for r in manifest)
