import pytest
from omegaconf import OmegaConf

from stages.train.plan import format_plan, make_plan, plan_from_cfg, unet_activation_bytes, unet_levels
from sdxl.presets import PAPER_BASE_UNET_PARAMS, get_preset

# Paper numbers: 2.567B trainable UNet, 817M text encoders + 84M VAE frozen; largest unit a 10-block transformer.
PAPER_COUNTS = {"trainable": PAPER_BASE_UNET_PARAMS, "frozen": 901_374_183, "largest_unit": 350_000_000}


def _plan(**kw):
    args = dict(kind="base", preset="full", resolution=256, world_size=256, micro_batch_size=8,
                global_batch_size=2048, strategy="deepspeed", zero_stage=2, param_counts=PAPER_COUNTS)
    args.update(kw)
    return make_plan(**args)


def test_paper_setting_fits_on_256_h100():
    plan = _plan()
    assert plan["accumulation_steps"] == 1 and plan["images_per_step"] == 2048
    assert plan["fits"] and 10 < plan["total_gb_per_gpu"] < 80
    mem = plan["memory_gb_per_gpu"]
    assert mem["weights"] == pytest.approx(2 * PAPER_BASE_UNET_PARAMS / 2**30, rel=1e-3)  # bf16, replicated
    assert mem["optimizer"] == pytest.approx(12 * PAPER_BASE_UNET_PARAMS / 256 / 2**30, rel=1e-2)
    assert "fits in 80" in format_plan(plan)


def test_sharding_orders_model_state_memory():
    totals = {}
    for strategy, zero in [("ddp", 2), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3), ("fsdp", 2)]:
        mem = _plan(strategy=strategy, zero_stage=zero)["memory_gb_per_gpu"]
        totals[(strategy, zero)] = sum(mem[k] for k in ("weights", "grads", "optimizer", "ema"))
    assert totals[("ddp", 2)] == pytest.approx(20 * PAPER_BASE_UNET_PARAMS / 2**30, rel=1e-3)
    assert totals[("ddp", 2)] > totals[("deepspeed", 1)] > totals[("deepspeed", 2)] > totals[("deepspeed", 3)]
    assert totals[("fsdp", 2)] < 1.0  # everything sharded 256 ways


def test_activations_scale_with_pixels_and_checkpointing_shrinks_them():
    unet = get_preset("full").unet_base
    a256, a1024 = unet_activation_bytes(unet, 256, False), unet_activation_bytes(unet, 1024, False)
    assert a1024 == pytest.approx(16 * a256, rel=1e-6)
    assert unet_activation_bytes(unet, 1024, True) < a1024 / 4
    assert 2 < a1024 / 2**30 < 20  # a few GB per 1024² sample in bf16
    levels = unet_levels(unet, 1024)
    assert [lv["side"] for lv in levels] == [128, 64, 32]
    assert [lv["depth"] for lv in levels] == [0, 2, 10]


def test_1024_without_checkpointing_needs_sharding_or_checkpointing():
    assert not _plan(resolution=1024, strategy="ddp")["fits"]
    assert _plan(resolution=1024, strategy="fsdp", activation_checkpointing=True)["fits"]


def test_indivisible_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="train.global_batch_size=2048 is not divisible"):
        _plan(world_size=3)
    with pytest.raises(ValueError, match="train.zero_stage"):
        _plan(zero_stage=4)


@pytest.mark.slow
def test_plan_from_cfg_counts_parameters_on_meta(capsys):
    cfg = OmegaConf.create({"model": {"preset": "full"}, "loader": {"resolution": 256},
                            "train": OmegaConf.load("pipeline/conf/train/default.yaml")})
    cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.strategy = 2048, 8, "fsdp"
    plan = plan_from_cfg(cfg, world_size=256)
    assert plan["params"]["trainable"] == PAPER_BASE_UNET_PARAMS
    assert 800e6 < plan["params"]["frozen"] < 1e9
    assert plan["fits"]


def test_dry_run_prints_the_plan_without_training(tmp_path, make_ctx, capsys):
    from stages.train.trainer import run_training

    cfg = OmegaConf.create({"model": {"preset": "tiny"}, "loader": {"resolution": 64},
                            "cluster": {"num_workers": 4},
                            "train": OmegaConf.load("pipeline/conf/train/default.yaml")})
    cfg.train.dry_run, cfg.train.global_batch_size, cfg.train.micro_batch_size = True, 16, 2
    ctx = make_ctx("pretrain256")
    out = run_training(cfg, ctx)
    assert out["dry_run"] and out["plan"]["accumulation_steps"] == 2 and out["plan"]["world_size"] == 4
    assert "training plan: base (tiny) at 64px" in capsys.readouterr().out
    assert not (tmp_path / "root" / "runs").exists()
