"""The evaluation samples with the unconditional input the evaluated checkpoint was trained with."""

from __future__ import annotations

import pytest
import torch

from stages.evaluate.generate import CheckpointRef, build_generator
from tests.evaluate import eval_config


@pytest.mark.parametrize("recorded, expected", [(None, "zeros"), ("zeros", "zeros"),
                                                ("empty_prompt", "empty_prompt")])
def test_generator_uses_the_checkpoints_recorded_unconditional_input(tmp_path, recorded, expected):
    info = {"stage": "pretrain256", "lineage": {} if recorded is None else {"unconditional": recorded}}
    gen = build_generator(CheckpointRef("random", info=info), eval_config(str(tmp_path)), torch.device("cpu"))
    assert gen.conditioner.unconditional_kind == expected


def test_unknown_recorded_unconditional_input_is_named(tmp_path):
    ref = CheckpointRef("random", info={"lineage": {"unconditional": "noise"}})
    with pytest.raises(ValueError, match="unconditional"):
        build_generator(ref, eval_config(str(tmp_path)), torch.device("cpu"))
