"""Running an image model (scorer, captioner) over the live rows of a sample table, batched, failure by failure.

Shared by the streaming pass (model actors between the CPU readers and the shard writers) and the metadata passes
over an existing dataset. Rows already rejected are passed over. Each image is decoded at the model's size (JPEGs
at a reduced DCT scale), so a 224-px model does not pay for a full decode. When a batch call fails, the images are
tried one by one, so only the image that breaks the model is rejected.
"""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa

from stages.data import images, process, records

ModelFn = Callable[[list, list[dict[str, Any]]], list]  # (RGB images, their rows) -> one result per image


def _decode(rows: list[dict[str, Any]], indices: list[int], max_side: int,
            out: list[Any]) -> list[tuple[int, Any]]:
    decoded = []
    for i in indices:
        try:
            decoded.append((i, images.decode_rgb(rows[i]["image"], max_side)))
        except Exception as err:  # the check decoded it already: rare, and a row fails, not the stage
            out[i] = err
    return decoded


def run_model(rows: list[dict[str, Any]], model_fn: ModelFn, batch_size: int,
              max_side: int) -> list[Any | Exception]:
    """One result (or the exception that replaced it) per row of ``rows``; images are decoded a batch at a time."""
    out: list[Any | Exception] = [None] * len(rows)
    for start in range(0, len(rows), batch_size):
        batch = _decode(rows, list(range(start, min(len(rows), start + batch_size))), max_side, out)
        if not batch:
            continue
        try:
            results = list(model_fn([img for _, img in batch], [rows[i] for i, _ in batch]))
            if len(results) != len(batch):
                raise ValueError(f"the model returned {len(results)} results for {len(batch)} images")
        except Exception:  # retry one by one, so one bad image does not cost its neighbours
            results = []
            for i, img in batch:
                try:
                    results.append(model_fn([img], [rows[i]])[0])
                except Exception as err:
                    results.append(err)
        for (i, _), result in zip(batch, results):
            out[i] = result
    return out


def apply(table: pa.Table, model_fn: ModelFn, batch_size: int, max_side: int,
          update: Callable[[dict[str, Any], Any], None], stage: str, failure: str) -> pa.Table:
    """``update(row, result)`` for each live row; a row whose image the model failed on is rejected (``failure``)."""
    rows = table.to_pylist()
    live = [r for r in rows if r.get("reject_reason") is None]
    for row, result in zip(live, run_model(live, model_fn, batch_size, max_side)):
        if isinstance(result, Exception):
            process.reject(row, stage, failure, f"{type(result).__name__}: {result}")
        else:
            update(row, result)
    return records.table_from_rows(rows, table.schema)
