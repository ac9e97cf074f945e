"""Offline CLIP tokenizers: the real 49408 vocabulary, open_clip's ids, SDXL's two pad tokens."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from sdxl.presets import CLIP_VOCAB_SIZE
from sdxl.tokenizers import (
    clip_vocab_and_merges,
    ensure_clip_bpe_files,
    load_tokenizers,
    tokenize,
)

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse, photorealistic, 8k!!",
    "",
    "Café au lait — naïve résumé 123",
    "don't stop; it's 2024's best (HDR) #art @home",
    "  many    spaces\tand\nnewlines  ",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


@pytest.fixture(scope="module")
def tokenizers(cache_dir):
    return load_tokenizers(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def open_clip_ids():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()(PROMPTS)


def test_vocabulary_is_clips_49408(tokenizers):
    tok_l, tok_g = tokenizers
    assert len(tok_l) == len(tok_g) == CLIP_VOCAB_SIZE
    vocab, merges = clip_vocab_and_merges()
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    assert len(merges) == 48894


def test_pad_ids_follow_sdxl(tokenizers):
    tok_l, tok_g = tokenizers
    assert tok_l.pad_token_id == 49407  # <|endoftext|>
    assert tok_g.pad_token_id == 0  # "!"
    ids_l, ids_g = tokenize(tok_l, ["a cat"]), tokenize(tok_g, ["a cat"])
    assert ids_l.shape == ids_g.shape == (1, 77)
    assert ids_l[0, :4].tolist() == ids_g[0, :4].tolist() == [49406, 320, 2368, 49407]
    assert (ids_l[0, 4:] == 49407).all() and (ids_g[0, 4:] == 0).all()


def test_ids_equal_open_clip(tokenizers, open_clip_ids):
    tok_l, tok_g = tokenizers
    ids_g = tokenize(tok_g, PROMPTS)
    assert torch.equal(ids_g, open_clip_ids)  # open_clip pads with 0, as tokenizer 2 does
    ids_l = tokenize(tok_l, PROMPTS)
    content = open_clip_ids != 0
    assert torch.equal(ids_l[content], open_clip_ids[content])
    assert (ids_l[~content] == 49407).all()


def test_long_prompts_are_truncated_with_a_warning(tokenizers, caplog):
    from open_clip.tokenizer import SimpleTokenizer

    long_prompt = "a very long prompt about " + "red and blue " * 40
    with caplog.at_level(logging.WARNING, logger="sdxl.tokenizers"):
        ids = tokenize(tokenizers[1], ["short", long_prompt])
    assert ids.shape == (2, 77)
    assert ids[1, -1] == 49407  # still ends with EOS
    assert torch.equal(ids[1], SimpleTokenizer()([long_prompt])[0])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "prompt 1" in warnings[0] and "truncated" in warnings[0]


def test_prompts_must_be_a_list_of_strings(tokenizers):
    with pytest.raises(TypeError, match="prompt"):
        tokenize(tokenizers[0], "a bare string")
    with pytest.raises(TypeError, match="prompt"):
        tokenize(tokenizers[0], ["ok", None])


def test_cache_files_are_written_once(cache_dir, tokenizers):
    folder = ensure_clip_bpe_files(cache_dir)
    assert sorted(os.listdir(folder)) == ["merges.txt", "vocab.json"]  # no temporary files left behind
    stamp = os.path.getmtime(os.path.join(folder, "vocab.json"))
    assert ensure_clip_bpe_files(cache_dir) == folder
    assert os.path.getmtime(os.path.join(folder, "vocab.json")) == stamp


def test_pretrained_folder_loads_and_bad_vocab_is_refused(tokenizers, tmp_path):
    tok_l, tok_g = tokenizers
    tok_l.save_pretrained(str(tmp_path / "sdxl" / "tokenizer"))
    tok_g.save_pretrained(str(tmp_path / "sdxl" / "tokenizer_2"))
    loaded_l, loaded_g = load_tokenizers(str(tmp_path / "sdxl"))
    assert len(loaded_l) == len(loaded_g) == CLIP_VOCAB_SIZE
    assert loaded_g.pad_token_id == 0 and loaded_l.pad_token_id == 49407
    assert torch.equal(tokenize(loaded_l, PROMPTS[:1]), tokenize(tok_l, PROMPTS[:1]))
    # An unreachable hub id offline gives a near-empty tokenizer: refused with a clear error, never used.
    from transformers import CLIPTokenizer

    CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}, merges=[]).save_pretrained(
        str(tmp_path / "broken" / "tokenizer_2"))
    with pytest.raises(ValueError, match="vocabulary of 3"):
        load_tokenizers(str(tmp_path / "broken"), need_l=False)


def test_unreachable_hub_id_offline_is_refused_not_used(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((ValueError, OSError), match="vocabulary of|offline|connect|cache"):
        load_tokenizers("stabilityai/stable-diffusion-xl-base-1.0")
