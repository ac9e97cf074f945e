import pytest
import torch

from stages.train.ema import EMA


def test_update_is_the_exponential_average():
    p = {"w": torch.tensor([0.0, 10.0])}
    ema = EMA(p, decay=0.9)
    ema.update({"w": torch.tensor([1.0, 0.0])})
    assert torch.allclose(ema.shadow["w"], torch.tensor([0.1, 9.0]))
    ema.update({"w": torch.tensor([1.0, 0.0])})
    assert torch.allclose(ema.shadow["w"], torch.tensor([0.19, 8.1]))
    assert ema.num_updates == 2


def test_kept_in_fp32_and_independent_of_the_parameter():
    param = torch.ones(3, dtype=torch.bfloat16)
    ema = EMA({"w": param}, decay=0.5)
    param.add_(1)
    assert ema.shadow["w"].dtype == torch.float32
    assert torch.equal(ema.shadow["w"], torch.ones(3))


def test_warmup_ramps_the_decay():
    ema = EMA({"w": torch.zeros(1)}, decay=0.9999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    for _ in range(90):
        ema.update({"w": torch.zeros(1)})
    assert ema.current_decay() == pytest.approx(91 / 100)
    ema.num_updates = 10**7
    assert ema.current_decay() == pytest.approx(0.9999)


def test_state_round_trip_and_mismatch_errors():
    ema = EMA({"a": torch.randn(2, 3)}, decay=0.99)
    ema.update({"a": torch.randn(2, 3)})
    other = EMA({"a": torch.zeros(2, 3)}, decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["a"], ema.shadow["a"]) and other.num_updates == 1
    with pytest.raises(ValueError, match="'a' has shape"):
        EMA({"a": torch.zeros(3, 2)}, decay=0.99).load_state_dict(ema.state_dict())
    with pytest.raises(KeyError):
        EMA({"b": torch.zeros(2, 3)}, decay=0.99).load_state_dict(ema.state_dict())
    with pytest.raises(KeyError):
        ema.update({"b": torch.zeros(2, 3)})


def test_decay_out_of_range():
    with pytest.raises(ValueError, match="train.ema_decay"):
        EMA({"a": torch.zeros(1)}, decay=1.0)
