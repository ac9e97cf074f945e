"""experiments/conditioning_paths.py: the synthetic task places its object where the offset says, each path carries
the offset through its own input only, and a short run reports its probe."""

import torch

from experiments.conditioning_paths import MAX_OFFSET, PositionTask, learn_position


def test_the_object_sits_at_the_offsets_column_and_the_probe_reads_it():
    task = PositionTask("crop", context_dim=8, pooled_dim=4)
    offsets = torch.tensor([0, 8, MAX_OFFSET])
    x0, _ = task.batch(offsets)
    # the background (-0.5 × pattern) contributes little next to the blob; the reading is within a fraction of a cell
    assert torch.allclose(task.column_profile(x0), task.true_column(offsets), atol=0.6)


def test_each_path_carries_the_offset_through_its_own_input_only():
    offsets = torch.tensor([0, MAX_OFFSET])
    _, crop = PositionTask("crop", 8, 4).batch(offsets)
    assert torch.equal(crop.context[0], crop.context[1]) and crop.time_ids[1, 3] == MAX_OFFSET
    _, text = PositionTask("text", 8, 4).batch(offsets)
    assert not torch.equal(text.context[0], text.context[1]) and torch.all(text.time_ids[:, 2:4] == 0)


def test_a_short_run_reports_the_probe():
    rows = learn_position("crop", steps=2, probe_every=1, batch=2)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 <= r["column_at_0"] <= 7 and 0 <= r["column_at_16"] <= 7 for r in rows)
