"""One small interface over the three ways we spread a model over ranks: DDP, FSDP2 and DeepSpeed ZeRO 1/2/3.

The loop only talks to :class:`Strategy`: wrap the model and optimizer, run forward/backward under the right
gradient-sync and autocast contexts, take an optimizer step with clipping, save/load the sharded training state,
and hand out the trainable tensors as named (possibly sharded) tensors for the EMA and for a full export on rank 0.

- ``ddp``: torch DDP (gloo on CPU, nccl on CUDA, as Ray Train set up the process group); state saved by rank 0.
- ``fsdp``: FSDP2 ``fully_shard`` on every unit of ``task.wrap_units`` then on the root; bf16 params/fp32 reduce on
  CUDA; state saved with torch.distributed.checkpoint (one file per rank, reshardable).
- ``deepspeed``: ZeRO ``train.zero_stage`` from a generated config with torch's AdamW as the client optimizer
  (DeepSpeed's fused optimizers JIT-compile C++ for over a minute); state via ``engine.save_checkpoint``.
"""

from __future__ import annotations

import abc
import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp", "deepspeed")
# File/folder names inside a checkpoint directory.
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
DCP_DIR = "dcp"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # where torch has a fused AdamW kernel


class Strategy(abc.ABC):
    """Base: behaviour shared by all strategies. Subclasses override wrapping, stepping and state I/O."""

    name = "base"
    shards_params = False  # True when local_params() holds only this rank's shards

    def __init__(self, train_cfg, device: torch.device, micro_batch_size: int, accumulation: int):
        self.cfg = train_cfg
        self.device = device
        self.micro_batch_size = micro_batch_size
        self.accumulation = accumulation
        self.grad_clip = float(train_cfg.grad_clip)
        self.bf16 = device.type == "cuda" and str(train_cfg.mixed_precision) == "bf16"

    # --- set-up -------------------------------------------------------------------------------------------
    def make_optimizer(self, params) -> torch.optim.Optimizer:
        c = self.cfg
        # The fused kernel on CPU too: torch's default there is a Python loop over every tensor, which cost the tiny
        # base ~24 ms a step (618 tensors) against ~6 ms fused (docs/decisions.md, "Where a tiny step's time goes").
        return torch.optim.AdamW(params, lr=float(c.lr), betas=tuple(float(b) for b in c.betas),
                                 weight_decay=float(c.weight_decay), eps=float(c.eps),
                                 fused=self.device.type in FUSED_ADAMW_DEVICES)

    def apply_activation_checkpointing(self, units: list[nn.Module]) -> None:
        """Recompute each unit's activations in backward; the composable API keeps parameter names unchanged."""
        from torch.distributed._composable import checkpoint

        for unit in units:
            checkpoint(unit)

    @abc.abstractmethod
    def wrap(self, model: nn.Module, units: list[nn.Module]) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(wrapped model, the torch optimizer whose param groups the lr scheduler drives)."""

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    # --- one optimizer step -------------------------------------------------------------------------------
    def autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync_context(self, model: nn.Module, last_micro_batch: bool):
        """Context for forward+backward of one micro-batch; gradients are reduced only on the last one."""
        return contextlib.nullcontext()

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor | float:
        """Clip to ``train.grad_clip``, step, zero the gradients; returns the global grad norm before clipping
        (a device tensor where possible, so the loop reads it back only when it logs)."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    # --- named tensors for EMA / export -------------------------------------------------------------------
    def local_params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.unwrap(model).named_parameters()}

    def gather_full(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Full CPU fp32 tensors on rank 0 (None elsewhere) from tensors laid out like ``local_params``.

        Collective: every rank must call it.
        """
        if _rank() != 0:
            return None
        return {n: t.detach().float().cpu().clone() for n, t in tensors.items()}

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The unwrapped model's state dict, full and on CPU, on rank 0 (None elsewhere). Collective."""
        params = self.gather_full(model, self.local_params(model))
        if params is None:
            return None
        module = self.unwrap(model)
        param_names = {n for n, _ in module.named_parameters()}
        buffers = {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k not in param_names}
        return {**params, **buffers}

    # --- checkpoint state ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, model, optimizer, directory: str, extra_sharded: dict | None = None) -> None:
        """Write this rank's share of model+optimizer state into ``directory`` (this rank's own folder)."""

    @abc.abstractmethod
    def load(self, model, optimizer, directory: str, extra_sharded: dict | None = None) -> None:
        """Restore what ``save`` wrote into ``directory``."""


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model, units):
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(self.device)
        optimizer = self.make_optimizer(model.parameters())
        if _world() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return model, optimizer

    def unwrap(self, model):
        return getattr(model, "module", model)

    def sync_context(self, model, last_micro_batch):
        if last_micro_batch or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()

    def save(self, model, optimizer, directory, extra_sharded=None):
        from safetensors.torch import save_file

        if _rank() == 0:  # replicated state: one copy is enough
            sd = {k: v.detach().cpu().contiguous() for k, v in self.unwrap(model).state_dict().items()}
            save_file(sd, os.path.join(directory, MODEL_FILE))
            torch.save(optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))

    def load(self, model, optimizer, directory, extra_sharded=None):
        from safetensors.torch import load_file

        sd = load_file(os.path.join(directory, MODEL_FILE), device=str(self.device))
        self.unwrap(model).load_state_dict(sd, strict=True)
        optimizer.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), map_location=self.device,
                                             weights_only=True))


class FSDPStrategy(Strategy):
    name = "fsdp"
    shards_params = True

    def wrap(self, model, units):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (_world(),))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16
              else MixedPrecisionPolicy())
        model = model.to(self.device)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model, self.make_optimizer(model.parameters())

    def sync_context(self, model, last_micro_batch):
        model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def local_params(self, model):
        return {n: (p.to_local() if hasattr(p, "to_local") else p).detach() for n, p in model.named_parameters()}

    def _as_dtensors(self, model, tensors):
        from torch.distributed.tensor import DTensor

        params = dict(model.named_parameters())
        out = {}
        for n, t in tensors.items():
            p = params[n]
            if isinstance(p, DTensor):
                out[n] = DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            else:
                out[n] = t
        return out

    def gather_full(self, model, tensors):
        full = {}
        for n, t in self._as_dtensors(model, tensors).items():
            value = t.full_tensor() if hasattr(t, "full_tensor") else t
            if _rank() == 0:
                full[n] = value.detach().float().cpu().clone()
        return full if _rank() == 0 else None

    def _state(self, model, optimizer, extra_sharded):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if extra_sharded:
            state["extra"] = {k: self._as_dtensors(model, v) for k, v in extra_sharded.items()}
        return state

    def save(self, model, optimizer, directory, extra_sharded=None):
        import torch.distributed.checkpoint as dcp

        # Each rank writes only its own __<rank>_0.distcp (rank 0 adds .metadata) into its own folder; Ray Train
        # merges the ranks' folders into one checkpoint directory.
        dcp.save(self._state(model, optimizer, extra_sharded), checkpoint_id=os.path.join(directory, DCP_DIR))

    def load(self, model, optimizer, directory, extra_sharded=None):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state(model, optimizer, extra_sharded)
        dcp.load(state, checkpoint_id=os.path.join(directory, DCP_DIR))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for key, tensors in (extra_sharded or {}).items():
            for n, t in state["extra"][key].items():
                tensors[n].copy_(t.to_local() if hasattr(t, "to_local") else t)


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def __init__(self, train_cfg, device, micro_batch_size, accumulation):
        super().__init__(train_cfg, device, micro_batch_size, accumulation)
        self.zero_stage = int(train_cfg.zero_stage)
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"train.zero_stage must be 1, 2 or 3 for strategy=deepspeed, got {self.zero_stage}")
        self.shards_params = self.zero_stage == 3

    def deepspeed_config(self) -> dict:
        return deepspeed_config(micro_batch_size=self.micro_batch_size, accumulation=self.accumulation,
                                world_size=_world(), zero_stage=self.zero_stage, grad_clip=self.grad_clip,
                                bf16=self.bf16)

    def wrap(self, model, units):
        import deepspeed

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            skip_cpu_shm_allreduce_build()
        optimizer = self.make_optimizer(model.parameters())
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.deepspeed_config())
        # ZeRO keeps the client optimizer's param-group dicts, so a LambdaLR on it drives the engine's lr.
        return engine, optimizer

    def unwrap(self, model):
        return model.module

    def backward(self, model, loss):
        model.backward(loss)  # the engine divides by gradient_accumulation_steps itself
        model.step()  # counts micro-steps; the real (clipped) step happens on the accumulation boundary

    def optimizer_step(self, model, optimizer):
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def local_params(self, model):
        if self.zero_stage == 3:
            return {n: p.ds_tensor.detach() for n, p in model.module.named_parameters()}
        return super().local_params(model)

    def gather_full(self, model, tensors):
        if self.zero_stage != 3:
            return super().gather_full(model, tensors)
        params = dict(model.module.named_parameters())
        full = {}
        for n, t in tensors.items():
            # ZeRO-3 partitions are equal-sized flat chunks (the last one padded): gather, cut, reshape.
            chunks = [torch.empty_like(t) for _ in range(_world())]
            dist.all_gather(chunks, t.contiguous())
            if _rank() == 0:
                p = params[n]
                full[n] = torch.cat(chunks)[: p.ds_numel].view(p.ds_shape).float().cpu().clone()
        return full if _rank() == 0 else None

    def save(self, model, optimizer, directory, extra_sharded=None):
        path = os.path.join(directory, DEEPSPEED_DIR)
        os.makedirs(os.path.join(path, DEEPSPEED_TAG), exist_ok=True)
        model.save_checkpoint(path, tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, model, optimizer, directory, extra_sharded=None):
        path = os.path.join(directory, DEEPSPEED_DIR)
        load_path, _ = model.load_checkpoint(path, tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {path}/{DEEPSPEED_TAG}")


def skip_cpu_shm_allreduce_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op when its communication backend starts (~30 s of C++
    per machine and virtualenv; docs/decisions.md). Only its inference all-reduce uses that op; ZeRO training reduces
    through the process group (gloo), so the op is marked unavailable and never built. DeepSpeed keeps the result of
    its op probe in this dict for the process, edits included."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(*, micro_batch_size: int, accumulation: int, world_size: int, zero_stage: int,
                     grad_clip: float, bf16: bool) -> dict:
    """The DeepSpeed config we generate (bf16 on CUDA, fp32 on CPU)."""
    return {
        "train_batch_size": micro_batch_size * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage, "contiguous_gradients": True, "overlap_comm": bf16},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW as the client optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def make_strategy(train_cfg, device: torch.device, micro_batch_size: int, accumulation: int) -> Strategy:
    name = str(train_cfg.strategy)
    classes = {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}
    if name not in classes:
        raise ValueError(f"train.strategy must be one of {list(STRATEGIES)}, got {name!r}")
    return classes[name](train_cfg, device, micro_batch_size, accumulation)
