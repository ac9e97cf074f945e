"""Text conditioning, micro-conditioning and classifier-free-guidance dropout."""

from __future__ import annotations

import pytest
import torch

from sdxl.conditioner import (
    Conditioning,
    TextConditioner,
    TextEmbeddings,
    base_time_ids,
    drop_text_conditioning,
    fourier_features,
    refiner_time_ids,
    vector_conditioning,
)
from sdxl.models import build_components, build_unet
from sdxl.presets import get_preset


@pytest.fixture(scope="module")
def comps(tmp_path_factory):
    return build_components("tiny", kind="both", tokenizer_cache=str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def base(comps):
    return TextConditioner.from_components(comps, kind="base")


@pytest.fixture(scope="module")
def refiner(comps):
    return TextConditioner.from_components(comps, kind="refiner")


def test_base_context_is_penultimate_l_then_g(base, comps):
    context, pooled = base.encode(["a cat", "a dog on a skateboard"])
    assert context.shape == (2, 77, 32 + 64) and pooled.shape == (2, 64)
    ids_l = base.tokenizer_l(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_g = base.tokenizer_g(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out_l = comps.text_encoder_l(ids_l, output_hidden_states=True)
        out_g = comps.text_encoder_g(ids_g, output_hidden_states=True)
    assert torch.allclose(context[:1, :, :32], out_l.hidden_states[-2], atol=1e-5)
    assert torch.allclose(context[:1, :, 32:], out_g.hidden_states[-2], atol=1e-5)
    assert not torch.allclose(out_g.hidden_states[-2], out_g.last_hidden_state)
    assert torch.allclose(pooled[:1], out_g.text_embeds, atol=1e-5)
    assert not context.requires_grad


def test_refiner_uses_bigg_only(refiner, base):
    context, pooled = refiner.encode("a cat")
    assert context.shape == (1, 77, 64) and pooled.shape == (1, 64)
    base_context, base_pooled = base.encode("a cat")
    assert torch.allclose(context, base_context[..., 32:], atol=1e-5)
    assert torch.allclose(pooled, base_pooled, atol=1e-5)


def test_time_ids_order_and_per_sample_tensors():
    ids = base_time_ids((768, 1024), (16, 0), (512, 640), batch_size=2)
    assert ids.tolist() == [[768, 1024, 16, 0, 512, 640]] * 2
    per_sample = base_time_ids(torch.tensor([[100, 200], [300, 400]]), torch.tensor([[1, 2], [3, 4]]), (64, 64))
    assert per_sample.tolist() == [[100, 200, 1, 2, 64, 64], [300, 400, 3, 4, 64, 64]]
    ref = refiner_time_ids((1024, 1024), (0, 0), 6.0, batch_size=3)
    assert ref.shape == (3, 5) and ref[0].tolist() == [1024, 1024, 0, 0, 6.0]
    ref2 = refiner_time_ids(torch.tensor([[10, 20], [30, 40]]), (0, 0), torch.tensor([5.0, 2.5]))
    assert ref2[:, 4].tolist() == [5.0, 2.5]
    with pytest.raises(ValueError, match="crop_coords"):
        base_time_ids((1, 2), (1, 2, 3), (1, 2))
    with pytest.raises(ValueError, match="batch"):
        base_time_ids(torch.zeros(3, 2), (0, 0), (1, 1), batch_size=2)


def test_fourier_features_match_the_unets_add_time_proj(comps):
    time_ids = base_time_ids(torch.tensor([[333, 1024], [64, 57]]), torch.tensor([[0, 12], [5, 0]]), (64, 64))
    ours = fourier_features(time_ids)
    theirs = comps.unet.add_time_proj(time_ids.flatten()).reshape(2, -1)
    assert ours.shape == (2, 6 * 256) and torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("kind,num_ids,expected", [("base", 6, 2816), ("refiner", 5, 2560)])
def test_vector_conditioning_width_at_full(kind, num_ids, expected):
    unet = build_unet("full", kind, device="meta")
    pooled = torch.zeros(2, get_preset("full").pooled_dim, device="meta")
    vector = vector_conditioning(pooled, torch.zeros(2, num_ids, device="meta"))
    assert vector.shape[1] == expected == unet.add_embedding.linear_1.in_features


def test_conditioning_drives_the_tiny_unets(base, refiner, comps):
    cond = base.encode_for_training(["a", "b"], torch.tensor([[64, 80], [48, 64]]), (0, 0), (64, 64), ucg_rate=0.0)
    out = comps.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), **cond.unet_kwargs()).sample
    assert out.shape == (2, 4, 8, 8)
    assert vector_conditioning(cond.pooled, cond.time_ids).shape[1] == comps.unet.add_embedding.linear_1.in_features
    rcond = refiner.encode_for_training(["a"], (64, 64), (0, 0), aesthetic_score=6.0, ucg_rate=0.0)
    assert rcond.time_ids.tolist() == [[64, 64, 0, 0, 6.0]]
    assert comps.refiner_unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), **rcond.unet_kwargs()).sample.shape == (
        1, 4, 8, 8)


def _random_embeddings(batch: int, with_l: bool = True) -> TextEmbeddings:
    gen = torch.Generator().manual_seed(1)
    return TextEmbeddings(context_g=torch.randn(batch, 3, 4, generator=gen),
                          pooled_g=torch.randn(batch, 5, generator=gen),
                          context_l=torch.randn(batch, 3, 2, generator=gen) if with_l else None)


def test_cfg_dropout_rate_and_independence():
    batch, p = 40_000, 0.1
    emb, empty = _random_embeddings(batch), _random_embeddings(1)
    dropped = drop_text_conditioning(emb, empty, p, torch.Generator().manual_seed(0))
    is_l = (dropped.context_l == empty.context_l).flatten(1).all(1)
    is_g = (dropped.context_g == empty.context_g).flatten(1).all(1)
    pooled_g = (dropped.pooled_g == empty.pooled_g).all(1)
    assert torch.equal(is_g, pooled_g)  # bigG's context and pooled go together
    assert abs(is_l.float().mean().item() - p) < 0.01 and abs(is_g.float().mean().item() - p) < 0.01
    assert abs((is_l & is_g).float().mean().item() - p * p) < 0.004  # independent per encoder
    kept = ~is_g
    assert torch.equal(dropped.context_g[kept], emb.context_g[kept])
    assert torch.equal(drop_text_conditioning(emb, empty, 0.0).context, emb.context)
    with pytest.raises(ValueError, match="p"):
        drop_text_conditioning(emb, empty, 1.5)


def test_joint_cfg_dropout_drops_both_encoders_together():
    batch, p = 40_000, 0.1
    emb, empty = _random_embeddings(batch), _random_embeddings(1)
    dropped = drop_text_conditioning(emb, empty, p, torch.Generator().manual_seed(0), joint=True)
    is_l = (dropped.context_l == empty.context_l).flatten(1).all(1)
    is_g = (dropped.context_g == empty.context_g).flatten(1).all(1)
    assert torch.equal(is_l, is_g)  # the whole unconditional input, never half of it
    assert abs((is_l & is_g).float().mean().item() - p) < 0.01


def test_training_dropout_keeps_micro_conditioning(base):
    sizes, crops = torch.tensor([[100, 200], [300, 400]]), torch.tensor([[7, 0], [0, 9]])
    gen = torch.Generator().manual_seed(0)
    cond = base.encode_for_training(["a cat", "a dog"], sizes, crops, (64, 64), ucg_rate=1.0, generator=gen)
    assert cond.time_ids.tolist() == [[100, 200, 7, 0, 64, 64], [300, 400, 0, 9, 64, 64]]
    kept = base.encode_for_training(["a cat", "a dog"], sizes, crops, (64, 64), ucg_rate=0.0)
    context, pooled = base.encode(["a cat", "a dog"])
    assert torch.allclose(kept.context, context, atol=1e-5) and torch.allclose(kept.pooled, pooled, atol=1e-5)
    with pytest.raises(ValueError, match="target_size"):
        base.encode_for_training(["a"], (1, 1), (0, 0))


def test_base_drops_text_to_zeros_and_the_refiner_to_the_empty_prompt(base, refiner):
    """SPEC: the base's unconditional input is zero context and pooled (sgm's non-legacy conditioner), the refiner's
    the encoding of "" (legacy); dropout uses exactly that."""
    gen = torch.Generator().manual_seed(0)
    dropped = base.encode_for_training(["a cat", "a dog"], (64, 64), (0, 0), (64, 64), ucg_rate=1.0, generator=gen)
    assert base.unconditional_kind == "zeros"
    assert dropped.context.shape == (2, 77, 96) and torch.count_nonzero(dropped.context) == 0
    assert torch.count_nonzero(dropped.pooled) == 0
    rdropped = refiner.encode_for_training(["a cat"], (64, 64), (0, 0), aesthetic_score=6.0, ucg_rate=1.0,
                                           generator=gen)
    empty_context, empty_pooled = refiner.encode([""])
    assert refiner.unconditional_kind == "empty_prompt"
    assert torch.count_nonzero(empty_context) > 0
    assert torch.allclose(rdropped.context, empty_context, atol=1e-5)
    assert torch.allclose(rdropped.pooled, empty_pooled, atol=1e-5)


def test_base_dropout_zeroes_each_encoder_independently(base):
    """CLIP-L's context part and bigG's context + pooled are dropped (to zeros) independently, each at ucg_rate."""
    prompts = [f"prompt {i}" for i in range(400)]
    cond = base.encode_for_training(prompts, (64, 64), (0, 0), (64, 64), ucg_rate=0.3,
                                    generator=torch.Generator().manual_seed(3))
    zero_l = (cond.context[..., :32] == 0).flatten(1).all(1)
    zero_g = (cond.context[..., 32:] == 0).flatten(1).all(1)
    assert torch.equal(zero_g, (cond.pooled == 0).all(1))  # bigG's context and pooled go together
    assert 0.2 < zero_l.float().mean() < 0.4 and 0.2 < zero_g.float().mean() < 0.4
    assert 0.03 < (zero_l & zero_g).float().mean() < 0.16  # ≈ 0.09: independent, not always together
    assert (zero_l & ~zero_g).any() and (zero_g & ~zero_l).any()


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_sampling_default_negative_is_what_training_dropped_to(kind, base, refiner):
    conditioner = base if kind == "base" else refiner
    extra = {"target_size": (64, 64)} if kind == "base" else {"aesthetic_score": 6.0}
    trained = conditioner.encode_for_training(["a cat"], (64, 64), (0, 0), ucg_rate=1.0,
                                              generator=torch.Generator().manual_seed(0), **extra)
    _, uncond = conditioner.encode_for_sampling("a cat", original_size=(64, 64))
    assert torch.allclose(uncond.context, trained.context, atol=1e-5)
    assert torch.allclose(uncond.pooled, trained.pooled, atol=1e-5)
    assert torch.equal(conditioner.unconditional_text(2).context, trained.context.expand(2, -1, -1))


def test_sampling_negative_conventions(base, refiner):
    # negative_prompt=None (the default) is the model's unconditional input: zeros for the base ...
    cond, uncond = base.encode_for_sampling(["a cat", "a dog"], original_size=(64, 64), num_images_per_prompt=3)
    assert isinstance(cond, Conditioning) and cond.context.shape == (6, 77, 96)
    assert torch.count_nonzero(uncond.context) == 0 and torch.count_nonzero(uncond.pooled) == 0
    assert cond.time_ids[0].tolist() == [64, 64, 0, 0, 64, 64] and torch.equal(uncond.time_ids, cond.time_ids)
    # ... while an explicit "" is encoded, as diffusers does (force_zeros_for_empty_prompt applies to None only)
    _, explicit_empty = base.encode_for_sampling("a cat", "", original_size=(64, 64))
    empty_context, empty_pooled = base.encode("")
    assert torch.count_nonzero(empty_context) > 0
    assert torch.allclose(explicit_empty.context, empty_context, atol=1e-5)
    assert torch.allclose(explicit_empty.pooled, empty_pooled, atol=1e-5)
    _, with_negative = base.encode_for_sampling("a cat", "blurry", original_size=(64, 64))
    assert torch.allclose(with_negative.context, base.encode("blurry")[0], atol=1e-5)
    # per-prompt negatives may mix None (unconditional) and text
    _, mixed = base.encode_for_sampling(["a cat", "a dog"], [None, "blurry"], original_size=(64, 64))
    assert torch.count_nonzero(mixed.context[0]) == 0 and torch.count_nonzero(mixed.pooled[0]) == 0
    assert torch.allclose(mixed.context[1:], base.encode("blurry")[0], atol=1e-5)
    # the refiner's unconditional input is the encoding of "" (explicit or not)
    rcond, runcond = refiner.encode_for_sampling("a cat", original_size=(64, 64))
    assert torch.allclose(runcond.context, refiner.encode("")[0], atol=1e-5)
    _, runcond_explicit = refiner.encode_for_sampling("a cat", "", original_size=(64, 64))
    assert torch.allclose(runcond_explicit.context, runcond.context, atol=1e-5)
    assert rcond.time_ids[0, 4] == 6.0 and runcond.time_ids[0, 4] == 2.5
    with pytest.raises(ValueError, match="negative_prompt"):
        base.encode_for_sampling(["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match="negative_prompt"):
        base.encode_for_sampling("a", [3])
    with pytest.raises(ValueError, match="prompt"):
        base.encode_for_sampling([], "")


def test_time_ids_accept_lists_of_pairs_beside_shared_pairs():
    ids = base_time_ids([[100, 200], [300, 400]], (0, 0), [64, 64])
    assert ids.tolist() == [[100, 200, 0, 0, 64, 64], [300, 400, 0, 0, 64, 64]]
    assert base_time_ids((1, 2), (3, 4), (5, 6)).shape == (1, 6)
    with pytest.raises(ValueError, match="aesthetic_score"):
        refiner_time_ids((1, 2), (0, 0), [[6.0]])
