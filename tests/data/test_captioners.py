from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from stages.data.captioners import Captioner

TINY_COCA = {
    "embed_dim": 32,  # CoCa feeds image tokens of this width to the multimodal decoder: equal widths
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8, "output_tokens": True},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


def _section(**overrides):
    base = {"kind": "coca", "arch": "test-tiny-coca", "pretrained": None, "model_config": TINY_COCA, "model": None,
            "random_init_ok": True, "max_new_tokens": 6, "batch_size": 2, "device": "cpu", "seed": 0}
    base.update(overrides)
    return OmegaConf.create(base)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (24 + 5 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


def test_coca_captions_one_string_per_image_deterministically():
    images = _images(5)
    first = Captioner.from_config(_section()).caption(images)
    second = Captioner.from_config(_section()).caption(images)
    assert isinstance(first, list) and len(first) == 5
    assert all(isinstance(text, str) and text.strip() for text in first)  # never empty, even with random weights
    assert first == second
    assert Captioner.from_config(_section()).caption([]) == []


def test_coca_respects_max_new_tokens():
    short = Captioner.from_config(_section(max_new_tokens=2)).caption(_images(2))
    long = Captioner.from_config(_section(max_new_tokens=8)).caption(_images(2))
    for a, b in zip(short, long):
        assert len(a) <= len(b)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="captioner.pretrained"):
        Captioner.from_config(_section(random_init_ok=False))
    with pytest.raises(FileNotFoundError, match="captioner.pretrained"):
        Captioner.from_config(_section(pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="captioner.kind"):
        Captioner.from_config(_section(kind="gpt"))
    with pytest.raises(ValueError, match="captioner.model"):
        Captioner.from_config(_section(kind="blip"))
    with pytest.raises(ValueError, match="max_new_tokens"):
        Captioner.from_config(_section(max_new_tokens=0))


def _tiny_blip_folder(folder) -> str:
    """A random tiny BLIP captioner saved like a hub model: config, safetensors, processor and a small vocab."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + "a red blue circle square on the left".split()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = BlipConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "encoder_hidden_size": 32, "bos_token_id": 5, "pad_token_id": 0,
                     "sep_token_id": 3, "eos_token_id": 3, "max_position_embeddings": 32},
        vision_config={"hidden_size": 32, "image_size": 32, "patch_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 64},
        projection_dim=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return str(folder)


def test_blip_from_a_local_folder(tmp_path):
    section = _section(kind="blip", model=_tiny_blip_folder(tmp_path), max_new_tokens=4)
    captioner = Captioner.from_config(section)
    first = captioner.caption(_images(3))
    assert len(first) == 3 and all(isinstance(text, str) and text for text in first)
    assert Captioner.from_config(section).caption(_images(3)) == first
    with pytest.raises(FileNotFoundError, match="captioner.model"):
        Captioner.from_config(_section(kind="blip", model=str(tmp_path / "missing")))
