"""URL-list units: download inside the Ray task that processes them, with img2dataset's downloader.

Each unit (a row range of a URL list, stages/data/plan.py) is fetched by ``ingest.download.threads`` threads calling
img2dataset's ``download_image_with_retry`` (its user agent, X-Robots-Tag check, timeout and retries), and every
image is handed on as it arrives, so decoding overlaps the network wait and no byte is written before the final
shards. Units are Ray tasks, so the downloads spread over every CPU node of the cluster, and a unit is resumable:
a re-run fetches again exactly the units that did not finish.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from typing import Any, Iterator

from stages.data import sources

# img2dataset's defaults: images whose X-Robots-Tag forbids use for AI training are not downloaded.
DISALLOWED_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})


@dataclass(frozen=True)
class DownloadOptions:
    url_column: str = "url"
    caption_column: str = "caption"
    threads: int = 16
    timeout_s: float = 10.0
    retries: int = 1
    user_agent_token: str | None = None

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"ingest.download.threads must be >= 1, got {self.threads}")
        if self.timeout_s <= 0:
            raise ValueError(f"ingest.download.timeout_s must be > 0, got {self.timeout_s}")
        if self.retries < 0:
            raise ValueError(f"ingest.download.retries must be >= 0, got {self.retries}")

    @classmethod
    def from_config(cls, section: Any) -> "DownloadOptions":
        section = section or {}
        return cls(url_column=str(section.get("url_column", "url")),
                   caption_column=str(section.get("caption_column", "caption")),
                   threads=int(section.get("threads", 16)), timeout_s=float(section.get("timeout_s", 10)),
                   retries=int(section.get("retries", 1)), user_agent_token=section.get("user_agent_token"))


def unit_requests(unit: dict, opts: DownloadOptions) -> list[dict[str, Any]]:
    """(key, url, caption, meta) of each row of a URL unit, in row order."""
    table = sources.read_unit_rows(unit)
    # Text URL lists were copied into the plan as (url, caption, extra_json); parquet lists are read in place.
    url_col, caption_col = ("url", "caption") if unit["kind"] == "url_rows" else (opts.url_column, opts.caption_column)
    out = []
    for offset, row in enumerate(table.to_pylist()):
        index = int(unit["start"]) + offset
        extra = json.loads(row["extra_json"]) if row.get("extra_json") else {
            k: v for k, v in row.items() if k not in (url_col, caption_col) and not isinstance(v, (bytes, bytearray))}
        url = row.get(url_col)
        out.append({"key": f"{unit['prefix']}{index:09d}", "url": None if url is None else str(url),
                    "caption": row.get(caption_col), "meta": {"columns": {**extra, "url": url}}})
    return out


def _fetch(request: dict, opts: DownloadOptions) -> tuple[dict, bytes | None, str | None]:
    from img2dataset.downloader import download_image_with_retry

    if not request["url"]:
        return request, None, "no URL"
    token = None if opts.user_agent_token is None else str(opts.user_agent_token).strip().lower()
    _, stream, error = download_image_with_retry((0, request["url"]), timeout=opts.timeout_s, retries=opts.retries,
                                                 user_agent_token=token,
                                                 disallowed_header_directives=set(DISALLOWED_DIRECTIVES))
    data = stream.getvalue() if stream is not None else None
    if stream is not None:
        stream.close()
    return request, data, error


def read_url_unit(unit: dict, opts: DownloadOptions) -> Iterator[dict[str, Any]]:
    """Raw samples of a URL unit as downloads finish (arrival order); failures are `download_failed` rejects."""
    requests = unit_requests(unit, opts)
    with ThreadPool(min(opts.threads, max(1, len(requests)))) as pool:
        for request, data, error in pool.imap_unordered(lambda r: _fetch(r, opts), requests):
            if data is None:
                yield sources.rejected(request["key"], request["url"] or "", "ingest", "download_failed",
                                       error or "no data")
                continue
            yield {"key": request["key"], "image": data, "caption_raw": request["caption"],
                   "source": request["url"], "meta": request["meta"]}
