"""Exact duplicates across units, found on metadata only: (key, sha256, unit) of every kept sample, never bytes.

Per sha256 the key first in sort order stays (the same rule as within a unit, so the result does not depend on how
the source was cut into units). Small datasets go through one task. Larger ones are hash-partitioned in two steps of
Ray tasks: each *map* task reads the hash columns of a group of work parts and writes them as one parquet file with a
row group per partition (sha256 prefix), each *reduce* task reads its row group of every such file and finds that
partition's duplicates. The driver only ever holds file names. Output: `work/_dedup/dups-NNNNNN.parquet`
(key, winner, unit; sorted by unit, so a reader of some units reads little), then `_dedup/_SUCCESS`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from stages.data import records, runner

DEDUP_DIR = "_dedup"
ROWS_PER_TASK = 2_000_000  # hash rows one task handles (about 200 MB of metadata)
HASH_COLUMNS = ["key", "sha256", "unit"]
DUPS_SCHEMA = pa.schema([("key", pa.string()), ("winner", pa.string()), ("unit", pa.int64())])


def duplicates_of(hashes: pa.Table) -> pa.Table:
    """(key, winner, unit) of every row whose sha256 an earlier key in sort order also has."""
    if hashes.num_rows == 0:
        return DUPS_SCHEMA.empty_table()
    ordered = hashes.sort_by([("sha256", "ascending"), ("key", "ascending")])
    digests = ordered.column("sha256")
    same_as_previous = np.zeros(ordered.num_rows, dtype=bool)
    if ordered.num_rows > 1:
        same_as_previous[1:] = pc.equal(digests.slice(1), digests.slice(0, ordered.num_rows - 1)).to_numpy(
            zero_copy_only=False)
    group_start = np.where(~same_as_previous, np.arange(ordered.num_rows), 0)
    first = np.maximum.accumulate(group_start)
    dup_rows = np.flatnonzero(same_as_previous)
    keys = ordered.column("key")
    out = pa.table({"key": keys.take(dup_rows), "winner": keys.take(first[dup_rows]),
                    "unit": ordered.column("unit").take(dup_rows)}, schema=DUPS_SCHEMA)
    return out.sort_by([("unit", "ascending"), ("key", "ascending")])


def _read_hashes(parts: list[str]) -> pa.Table:
    return records.read_tables(parts, records.WORK_SCHEMA, HASH_COLUMNS)


def _single(parts: list[str], out_uri: str) -> int:
    dups = duplicates_of(_read_hashes(parts))
    storage.write_bytes_atomic(out_uri, records.parquet_bytes(dups, row_group_size=1 << 16))
    return dups.num_rows


def _partition(parts: list[str], out_uri: str, partitions: int) -> None:
    """Map step: the hash rows of ``parts`` as one file, row group p = rows whose sha256 prefix falls in partition p."""
    hashes = _read_hashes(parts)
    prefix = pc.utf8_slice_codeunits(hashes.column("sha256"), 0, 8)
    bucket = np.array([int(p, 16) % partitions for p in prefix.to_pylist()], dtype=np.int64)
    import io

    buf = io.BytesIO()
    with pq.ParquetWriter(buf, hashes.schema, compression="zstd") as writer:
        for p in range(partitions):  # every partition gets a row group, empty or not: reducers index by number
            writer.write_table(hashes.filter(pa.array(bucket == p)), row_group_size=max(1, hashes.num_rows))
    storage.write_bytes_atomic(out_uri, buf.getvalue())


def _reduce(partition: int, inputs: list[str], out_uri: str) -> int:
    tables = []
    for uri in inputs:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            tables.append(pq.ParquetFile(f).read_row_group(partition))
    dups = duplicates_of(pa.concat_tables(tables) if tables else records.WORK_SCHEMA.empty_table().select(
        HASH_COLUMNS))
    storage.write_bytes_atomic(out_uri, records.parquet_bytes(dups, row_group_size=1 << 16))
    return dups.num_rows


def find_all(work_dir: str, parts: list[str], total_rows: int, rows_per_task: int = ROWS_PER_TASK) -> int:
    """Write the duplicate files for ``parts`` (resumable: a finished dedup is kept); returns the duplicate count."""
    out_dir = storage.join(work_dir, DEDUP_DIR)
    marker = storage.join(out_dir, records.SUCCESS_NAME)
    if storage.exists(marker):
        return int(storage.read_json(marker)["duplicates"])
    if total_rows <= rows_per_task:
        count = runner.map_tasks(_single, [parts], storage.join(out_dir, records.part_name(0, "dups")))[0]
    else:
        partitions = -(-total_rows // rows_per_task)
        groups = runner.batches(parts, max(1, len(parts) * rows_per_task // max(1, total_rows)))
        inputs = [storage.join(out_dir, records.part_name(i, "hashes")) for i in range(len(groups))]
        runner.map_tasks(_map_group, list(zip(groups, inputs)), partitions)
        outputs = [storage.join(out_dir, records.part_name(p, "dups")) for p in range(partitions)]
        count = sum(runner.map_tasks(_reduce_group, list(zip(range(partitions), outputs)), inputs))
    storage.write_json_atomic(marker, {"duplicates": count})
    return count


def _map_group(group_and_out: tuple[list[str], str], partitions: int) -> None:
    _partition(group_and_out[0], group_and_out[1], partitions)


def _reduce_group(partition_and_out: tuple[int, str], inputs: list[str]) -> int:
    return _reduce(partition_and_out[0], inputs, partition_and_out[1])


def read_for_units(work_dir: str, lo: int, hi: int) -> pa.Table:
    """The duplicates of units ``lo..hi`` (row-group statistics skip the rest of each file)."""
    files = records.list_parts(storage.join(work_dir, DEDUP_DIR), "dups-")
    return records.read_tables(files, DUPS_SCHEMA, filters=[("unit", ">=", lo), ("unit", "<=", hi)])
