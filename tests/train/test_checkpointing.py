"""Checkpoint contents, verification, fallback and mismatch errors — in one process (no Ray), plus one Ray run
that falls back from a corrupted newest checkpoint."""

import logging
import os

import pytest
import torch

from stages.train import checkpointing as ck
from stages.train.ema import EMA
from stages.train.loop import seed_step
from stages.train.schedules import make_lr_scheduler
from stages.train.strategies import make_strategy
from tests.train.toy_task import ToyTask, toy_cfg


class Run:
    """One process's training state built the way the loop builds it (DDP strategy, world size 1)."""

    def __init__(self, tmp_path, width=16):
        self.cfg = toy_cfg(str(tmp_path), workers=1, toy={"width": width})
        self.task = ToyTask(self.cfg)
        model = self.task.build_model()
        self.signature = ck.model_signature(model)
        self.strategy = make_strategy(self.cfg.train, torch.device("cpu"), 2, 1)
        self.model, self.optimizer = self.strategy.wrap(model, [])
        self.scheduler = make_lr_scheduler(self.optimizer, self.cfg.train)
        self.ema = EMA(self.strategy.local_params(self.model), 0.9)
        self.generator = torch.Generator()

    def train_step(self, step):
        seed_step(self.generator, 0, step, 0)
        x = torch.randn(4, 8, generator=self.generator)
        loss = (self.model(x) - 1).pow(2).mean()
        self.strategy.backward(self.model, loss)
        self.strategy.optimizer_step(self.model, self.optimizer)
        self.scheduler.step()
        self.ema.update(self.strategy.local_params(self.model))

    def save(self, directory, step):
        ck.save_checkpoint(directory, step=step, strategy=self.strategy, model=self.model, optimizer=self.optimizer,
                           scheduler=self.scheduler, ema=self.ema, generator=self.generator,
                           meta={"model_name": "toy", "signature": self.signature, "world_size": 1})

    def resume(self, paths):
        return ck.resume(paths, signature=self.signature, strategy=self.strategy, model=self.model,
                         optimizer=self.optimizer, scheduler=self.scheduler, ema=self.ema,
                         generator=self.generator, world_size=1)


def _trained_run_with_checkpoints(tmp_path, steps=(1, 2)):
    run = Run(tmp_path)
    run_dir = tmp_path / "runs" / "s"
    snapshots = {}
    for step in range(1, max(steps) + 1):
        run.train_step(step - 1)
        if step in steps:
            run.save(str(run_dir / ck.checkpoint_dir_name(step)), step)
            snapshots[step] = {k: v.clone() for k, v in run.model.state_dict().items()}
    return run, run_dir, snapshots


def test_checkpoint_files_and_exact_restore(tmp_path):
    run, run_dir, snaps = _trained_run_with_checkpoints(tmp_path)
    latest = run_dir / "checkpoint_000000002"
    assert {"model.safetensors", "optimizer.pt", "ema.safetensors", "trainer_state.pt", "rng_rank00000.pt",
            "meta.json", "files_rank00000.json"} <= set(os.listdir(latest))
    fresh = Run(tmp_path)
    step, path = fresh.resume(ck.candidates(str(latest), None))
    assert (step, path) == (2, str(latest))
    for k, v in snaps[2].items():
        assert torch.equal(fresh.model.state_dict()[k], v)
    assert all(torch.equal(fresh.ema.shadow[k], run.ema.shadow[k]) for k in run.ema.shadow)
    assert fresh.ema.num_updates == 2 and fresh.scheduler.last_epoch == 2
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(run.optimizer.param_groups[0]["lr"])
    assert torch.equal(fresh.generator.get_state(), run.generator.get_state())
    # Both continue identically.
    run.train_step(2)
    fresh.train_step(2)
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in run.model.state_dict().items())


def test_candidates_order_and_run_folder(tmp_path):
    _, run_dir, _ = _trained_run_with_checkpoints(tmp_path, steps=(1, 2, 3))
    latest = str(run_dir / "checkpoint_000000003")
    assert [ck.step_of(p) for p in ck.candidates(latest, None)] == [3, 2, 1]
    assert [ck.step_of(p) for p in ck.candidates(str(run_dir / "checkpoint_000000002"), None)] == [2, 1]
    assert [ck.step_of(p) for p in ck.candidates(None, str(run_dir))] == [3, 2, 1]
    assert ck.candidates(None, None) == []
    with pytest.raises(FileNotFoundError, match="train.resume_from"):
        ck.candidates(None, str(tmp_path / "nothing"))


@pytest.mark.parametrize("victim, garbage", [("model.safetensors", b"not a safetensors file"),
                                             ("trainer_state.pt", None), ("meta.json", b"{broken")])
def test_corrupted_latest_falls_back_to_previous(tmp_path, caplog, victim, garbage):
    _, run_dir, snaps = _trained_run_with_checkpoints(tmp_path)
    path = run_dir / "checkpoint_000000002" / victim
    if garbage is None:  # same size, unreadable content: caught when loading, not by the size check
        garbage = b"\0" * path.stat().st_size
    path.write_bytes(garbage)
    fresh = Run(tmp_path)
    with caplog.at_level(logging.WARNING):
        step, used = fresh.resume(ck.candidates(str(run_dir / "checkpoint_000000002"), None))
    assert step == 1 and used.endswith("checkpoint_000000001")
    assert "falling back" in caplog.text and "checkpoint_000000002" in caplog.text
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in snaps[1].items())


def test_all_corrupted_is_an_error(tmp_path):
    _, run_dir, _ = _trained_run_with_checkpoints(tmp_path, steps=(1,))
    (run_dir / "checkpoint_000000001" / "optimizer.pt").write_bytes(b"xx")
    with pytest.raises(ck.CorruptCheckpointError, match="optimizer.pt"):
        Run(tmp_path).resume(ck.candidates(str(run_dir / "checkpoint_000000001"), None))


def test_different_model_config_names_the_file(tmp_path):
    _, run_dir, _ = _trained_run_with_checkpoints(tmp_path, steps=(1,))
    wider = Run(tmp_path, width=32)
    with pytest.raises(ck.CheckpointMismatchError, match=r"checkpoint_000000001/meta.json.*different model") as e:
        wider.resume(ck.candidates(str(run_dir / "checkpoint_000000001"), None))
    assert "shape differences" in str(e.value) and "blocks.0.0.weight: checkpoint [16] vs model [32]" in str(e.value)


def test_different_strategy_is_an_error(tmp_path):
    _, run_dir, _ = _trained_run_with_checkpoints(tmp_path, steps=(1,))
    run = Run(tmp_path)
    meta = ck.read_meta(str(run_dir / "checkpoint_000000001"))
    run.strategy.name = "fsdp"
    with pytest.raises(ck.CheckpointMismatchError, match="train.strategy='ddp'"):
        ck.check_compatible(str(run_dir / "checkpoint_000000001"), meta, signature=run.signature,
                            strategy=run.strategy, world_size=1)


@pytest.mark.slow
def test_ray_run_falls_back_from_a_corrupted_newest_checkpoint_and_resumes_exactly(tmp_path, ray_local):
    """A run folder whose newest checkpoint is corrupted: the Ray run resumes from the one before and ends at the
    straight run's weights. The folder is a copy of the session's reference run (checkpoints at steps 2 and 4)."""
    import shutil

    from pipeline.context import StageContext
    from stages.train.trainer import run_training
    from tests.train.toy_task import assert_same_weights, final_weights, reference_run

    ref_root, reference = reference_run()
    previous = tmp_path / "previous"
    for name in ("checkpoint_000000002", "checkpoint_000000004"):
        shutil.copytree(os.path.join(ref_root, "runs", "reference", name), previous / name)
    with open(previous / "checkpoint_000000004" / "optimizer.pt", "wb") as f:
        f.write(b"corrupted")
    root = str(tmp_path / "root")
    out = run_training(toy_cfg(root, resume_from=str(previous)), StageContext(root=root, stage="fallback"))
    assert out["step"] == 4
    assert out["metrics"]["resumed_from_step"] == 2
    for which in ("model", "ema"):
        assert_same_weights(final_weights(root, "fallback", which), reference[which])


def test_resuming_a_checkpoint_of_another_config_warns(tmp_path, caplog):
    """A re-run with changed settings silently continued the old run's step and optimizer; now it says so."""
    run = Run(tmp_path)
    run.train_step(0)
    latest = str(tmp_path / "runs" / "s" / ck.checkpoint_dir_name(1))
    ck.save_checkpoint(latest, step=1, strategy=run.strategy, model=run.model, optimizer=run.optimizer,
                       scheduler=run.scheduler, ema=run.ema, generator=run.generator,
                       meta={"model_name": "toy", "signature": run.signature, "world_size": 1, "stage": "s",
                             "config_hash": "aaaa"})

    def resume(stage, cfg_hash):
        fresh = Run(tmp_path)
        caplog.clear()
        with caplog.at_level("WARNING", logger="stages.train.checkpointing"):
            step, _ = ck.resume(ck.candidates(latest, None), signature=fresh.signature, strategy=fresh.strategy,
                                model=fresh.model, optimizer=fresh.optimizer, scheduler=fresh.scheduler,
                                ema=fresh.ema, generator=fresh.generator, world_size=1, stage=stage,
                                cfg_hash=cfg_hash)
        assert step == 1
        return [r.getMessage() for r in caplog.records if "another config" in r.getMessage()]

    changed = resume("s", "bbbb")
    assert len(changed) == 1 and "hash aaaa, now bbbb" in changed[0] and str(tmp_path / "runs" / "s") in changed[0]
    assert resume("s", "aaaa") == []  # a restart of the same run (Ray Train after a failure)
    assert resume("child", "bbbb") == []  # a parent stage's checkpoint (train.resume_from)
