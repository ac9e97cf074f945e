import math

import pytest
import torch
from omegaconf import OmegaConf

from stages.train.schedules import WarmupThenDecay, make_lr_scheduler


def _lrs(schedule, steps=12, warmup=4, peak=1e-4, min_lr=1e-6):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    cfg = OmegaConf.create({"lr": peak, "min_lr": min_lr, "warmup_steps": warmup, "max_steps": steps,
                            "schedule": schedule})
    sched = make_lr_scheduler(opt, cfg)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_is_linear_to_peak():
    lrs = _lrs("cosine")
    assert lrs[:4] == pytest.approx([0.25e-4, 0.5e-4, 0.75e-4, 1e-4])


def test_cosine_decays_monotonically_to_min_lr():
    f = WarmupThenDecay(peak_lr=1e-4, min_lr=1e-6, warmup_steps=10, max_steps=110, schedule="cosine")
    values = [f(s) * 1e-4 for s in range(10, 111)]
    assert values[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(1e-6)
    assert values[50] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10_000) * 1e-4 == pytest.approx(1e-6)  # past max_steps: stays at the floor


def test_constant_after_warmup():
    assert _lrs("constant")[4:] == pytest.approx([1e-4] * 8)


def test_paper_schedule_values():
    f = WarmupThenDecay(peak_lr=1e-4, min_lr=1e-6, warmup_steps=10_000, max_steps=600_000, schedule="cosine")
    assert f(0) * 1e-4 == pytest.approx(1e-8)
    assert f(9_999) == pytest.approx(1.0)
    assert f(600_000) * 1e-4 == pytest.approx(1e-6)


def test_scheduler_state_round_trips():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    cfg = OmegaConf.create({"lr": 1e-3, "min_lr": 0.0, "warmup_steps": 2, "max_steps": 10, "schedule": "cosine"})
    sched = make_lr_scheduler(opt, cfg)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched2 = make_lr_scheduler(opt2, cfg)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 5
    assert sched2.lr_lambdas[0](5) == sched.lr_lambdas[0](5)


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "linear"}, "train.schedule"),
    ({"min_lr": 1.0}, "train.min_lr"),
    ({"peak_lr": 0.0}, "train.lr"),
    ({"max_steps": 0}, "train.max_steps"),
])
def test_bad_settings_name_the_key(kwargs, match):
    args = {"peak_lr": 1e-4, "min_lr": 1e-6, "warmup_steps": 1, "max_steps": 10, "schedule": "cosine", **kwargs}
    with pytest.raises(ValueError, match=match):
        WarmupThenDecay(**args)
