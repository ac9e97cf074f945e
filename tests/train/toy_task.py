"""A toy TrainTask (a small MLP regression) and batch iterator with the interfaces of stages/train/tasks.py and
stages/train/data_loader.py, so the training machinery is tested fast and independently of the SDXL models.

``toy.kill_at_step`` / ``toy.kill_rank`` / ``toy.kill_marker`` make that rank SIGKILL its own process at that step,
once (the marker file remembers it happened), to test Ray Train's restart from the last checkpoint. It first waits
until Ray Train has registered checkpoint ``toy.kill_wait_checkpoint`` in the run's checkpoint_manager_snapshot.json
``toy.kill_wait_snapshot`` (at most ``toy.kill_delay_s``): the controller collects reported checkpoints when it polls
the workers (every 2 s), and a worker that dies before that poll takes its queued report with it.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

TOY_DEFAULTS = {"dim": 8, "width": 16, "depth": 3, "dropout": 0.1, "kill_at_step": None, "kill_rank": 1,
                "kill_marker": None, "kill_delay_s": 60.0, "kill_wait_snapshot": None,
                "kill_wait_checkpoint": None, "data_delay_s": 0.0}


def toy_option(cfg, key):
    value = OmegaConf.select(cfg, f"toy.{key}")
    return TOY_DEFAULTS[key] if value is None else value


class ToyModel(nn.Module):
    def __init__(self, dim: int, width: int, depth: int, dropout: float):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout))
            for _ in range(depth))
        self.out = nn.Linear(width, dim)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class ToyTask:
    model_name = "toy"

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = torch.device("cpu")

    def build_model(self) -> nn.Module:
        gen_state = torch.get_rng_state()
        torch.manual_seed(1234)  # identical initial weights on every rank and every attempt
        model = ToyModel(int(toy_option(self.cfg, "dim")), int(toy_option(self.cfg, "width")),
                         int(toy_option(self.cfg, "depth")), float(toy_option(self.cfg, "dropout")))
        torch.set_rng_state(gen_state)
        return model

    def setup(self, device: torch.device) -> None:
        self.device = device

    def loss(self, model, batch: dict, generator: torch.Generator):
        self._maybe_die(batch["step"])
        x = batch["x"] + 0.01 * torch.randn(batch["x"].shape, generator=generator, device=batch["x"].device)
        loss = torch.nn.functional.mse_loss(model(x), batch["y"])
        return loss, {"target_mean": float(batch["y"].mean())}

    def _maybe_die(self, step: int) -> None:
        kill_at, marker = toy_option(self.cfg, "kill_at_step"), toy_option(self.cfg, "kill_marker")
        if kill_at is None or int(step) != int(kill_at) or not marker or os.path.exists(marker):
            return
        import ray.train

        if ray.train.get_context().get_world_rank() == int(toy_option(self.cfg, "kill_rank")):
            self._wait_until_registered()
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    def _wait_until_registered(self) -> None:
        snapshot, name = toy_option(self.cfg, "kill_wait_snapshot"), toy_option(self.cfg, "kill_wait_checkpoint")
        deadline = time.monotonic() + float(toy_option(self.cfg, "kill_delay_s"))
        while time.monotonic() < deadline:
            if snapshot and name and os.path.exists(snapshot):
                with open(snapshot) as f:
                    if name in f.read():
                        return
            time.sleep(0.2)

    def wrap_units(self, model) -> list[nn.Module]:
        return list(model.blocks)

    def sample_images(self, model, step: int) -> list:
        with torch.no_grad():
            out = model(torch.linspace(-1, 1, 16 * int(toy_option(self.cfg, "dim"))).view(16, -1).to(self.device))
        arr = ((out - out.min()) / (out.max() - out.min() + 1e-8) * 255).byte().cpu().numpy()
        return [Image.fromarray(arr, mode="L"), Image.fromarray(255 - arr, mode="L")]

    def save_pretrained(self, model, out_dir: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({k: toy_option(self.cfg, k) for k in ("dim", "width", "depth")}, f)

    def lineage_tags(self) -> dict[str, str]:
        return {"task": "toy", "parent_checkpoint": "scratch"}


def make_task(cfg) -> ToyTask:
    return ToyTask(cfg)


def make_batch_iterator(cfg, rank: int, world_size: int, micro_batch_size: int, start_step: int, accumulation: int):
    """Deterministic from (seed, step, rank, micro index), so a resumed run sees the same batches."""
    dim = int(toy_option(cfg, "dim"))
    delay = float(toy_option(cfg, "data_delay_s"))
    target = torch.from_numpy(np.random.default_rng(99).standard_normal((dim, dim)).astype(np.float32))
    step = start_step
    while True:
        for micro in range(accumulation):
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [int(cfg.train.seed), step, rank, micro]).generate_state(1)[0]))
            x = torch.randn(micro_batch_size, dim, generator=gen)
            if delay:
                time.sleep(delay)
            yield {"x": x, "y": torch.tanh(x @ target), "step": step}
        step += 1


TRAIN_DEFAULTS = os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "conf", "train", "default.yaml")


def toy_cfg(root: str, *, workers: int = 2, toy: dict | None = None, **train):
    """A composed-like config: the real train section (+ overrides), a cluster section and the toy task."""
    train_section = OmegaConf.load(TRAIN_DEFAULTS)
    base = {"task_factory": "tests.train.toy_task:make_task",
            "batches_factory": "tests.train.toy_task:make_batch_iterator",
            "global_batch_size": 8, "micro_batch_size": 2, "max_steps": 4, "warmup_steps": 2,
            "schedule": "constant", "log_every": 1, "checkpoint_every": 2, "lr": 1e-2, "min_lr": 1e-4,
            "ema_decay": 0.9, "max_failures": 0}
    train_section = OmegaConf.merge(train_section, base, train)
    return OmegaConf.create({"paths": {"root": root}, "model": {"preset": "tiny"},
                             "cluster": {"num_workers": workers, "use_gpu": False, "cpus_per_worker": 1},
                             "train": train_section, "toy": {**TOY_DEFAULTS, **(toy or {})}})


def final_weights(root: str, stage: str, which: str = "model") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(root, "runs", stage, "final", which, "model.safetensors"))


_REFERENCE: dict = {}


def reference_run() -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """(root, {"model": weights, "ema": weights}) of a straight 4-step DDP run on 2 workers, made once per session.

    Every strategy computes the same steps (same data, seeds and math), so resumed runs of any strategy must end
    at these weights within float tolerance. The run folder keeps checkpoint_000000002 and checkpoint_000000004.
    """
    if not _REFERENCE:
        import atexit
        import shutil
        import tempfile

        from pipeline.context import StageContext
        from stages.train.trainer import run_training

        root = tempfile.mkdtemp(prefix="toy-reference-")
        atexit.register(shutil.rmtree, root, True)
        run_training(toy_cfg(root, strategy="ddp"), StageContext(root=root, stage="reference"))
        _REFERENCE["root"] = root
        _REFERENCE["weights"] = {w: final_weights(root, "reference", w) for w in ("model", "ema")}
    return _REFERENCE["root"], _REFERENCE["weights"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"
