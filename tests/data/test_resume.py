"""Resume after a kill: the clean-up of a killed run's temporary files. The kill itself (`stage=data` SIGKILLed
mid-pass, re-run, only the unfinished units redone) is tests/cluster/test_data_faults.py."""

from __future__ import annotations


def test_a_killed_runs_temp_files_are_removed_and_nothing_else(tmp_path):
    """Whether the kill lands in a write is up to timing; the clean-up the re-run relies on is checked here."""
    from stages.data.stream import _remove_stale_temp_files

    work, bucket = tmp_path / "work", tmp_path / "shards" / "64x64"
    for folder in (work, bucket):
        folder.mkdir(parents=True)
    kept = [work / "part-000001.parquet", bucket / "64x64-00000.tar"]
    stale = [work / ".tmp-part-000005.parquet-4r_wqihx", bucket / ".tmp-64x64-00001.tar-x1"]
    for path in kept + stale:
        path.write_bytes(b"x")
    _remove_stale_temp_files(str(work))
    _remove_stale_temp_files(str(tmp_path / "shards"))
    assert [p for p in kept + stale if p.exists()] == kept
