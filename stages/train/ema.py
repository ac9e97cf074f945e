"""Exponential moving average of the trainable weights, kept in fp32.

The EMA sees only named tensors, never the wrapper: under DDP / ZeRO-1/2 those are the full (replicated) parameters;
under FSDP and ZeRO-3 they are this rank's shards (``strategies.Strategy.local_params``), so EMA memory shards with
the model and the export gathers it like the weights.
"""

from __future__ import annotations

import torch


class EMA:
    """``shadow = decay_t * shadow + (1 - decay_t) * param`` after each optimizer step.

    With ``warmup=True`` the decay ramps as ``min(decay, (1 + n) / (10 + n))`` over the ``n`` updates made so far
    (the usual warm-up so early EMA weights are not dominated by the random initialisation).
    """

    def __init__(self, params: dict[str, torch.Tensor], decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        if params.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) ^ set(params))[:5]
            raise KeyError(f"EMA parameters differ from the model's: {missing}")
        decay = self.current_decay()
        shadows = list(self.shadow.values())
        values = [params[name].detach().float() for name in self.shadow]
        # One fused kernel over all tensors: lerp(shadow, value, 1 - decay) == decay*shadow + (1-decay)*value.
        torch._foreach_lerp_(shadows, values, 1.0 - decay)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {name: t.detach().cpu() for name, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            diff = sorted(set(self.shadow) ^ set(shadow))[:5]
            raise KeyError(f"EMA state does not match the model, differing names: {diff}")
        for name, value in shadow.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA tensor {name!r} has shape {tuple(value.shape)}, "
                                 f"model has {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)
        self.num_updates = int(state["num_updates"])
