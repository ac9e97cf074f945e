"""The two CLIP BPE tokenizers of SDXL, available offline.

Both SDXL text encoders share CLIP's 49408-token BPE vocabulary; they differ only in the pad token: tokenizer 1
(CLIP ViT-L) pads with ``<|endoftext|>``, tokenizer 2 (OpenCLIP bigG) pads with ``!`` (id 0), as the public SDXL
``tokenizer_2`` does.

Why we build the vocabulary ourselves: offline, transformers' ``CLIPTokenizer.from_pretrained(hub_id)`` raises
nothing and hands back a tokenizer with a 2-token vocabulary (``vocab_file=``/``merges_file=`` kwargs are ignored the
same way), which would silently turn every prompt into unknown tokens. So by default we derive ``vocab.json`` and
``merges.txt`` from the BPE merges file that open_clip ships (exactly as open_clip's ``SimpleTokenizer`` builds its
vocabulary), write them once into a cache folder, and load transformers' ``CLIPTokenizer`` from there. A configured
folder or hub id is loaded instead when given, and any tokenizer whose vocabulary is not 49408 is refused.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
from collections.abc import Sequence

import torch
from transformers import CLIPTokenizer

from sdxl.checkpoint import write_bytes_atomic_local
from sdxl.presets import CLIP_VOCAB_SIZE, TOKENIZER_MAX_LENGTH

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN_L = EOS_TOKEN
PAD_TOKEN_G = "!"
# Number of merges CLIP uses from the 16e6 BPE file: 49152 - 256 - 2 (open_clip's SimpleTokenizer, OpenAI CLIP).
_NUM_MERGES = 49152 - 256 - 2
_CACHE_SUBDIR = "clip-bpe-16e6"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sdxl-pipeline", "tokenizers")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table (the first 256 vocabulary entries)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars]))


def _open_clip_bpe_path() -> str:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed: it ships the CLIP BPE file the tokenizers are built from")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP BPE file missing from the open_clip install: {path}")
    return path


def clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token → id) and merge list, derived from open_clip's BPE file.

    Order as in open_clip: 256 byte symbols, the same with ``</w>``, one token per merge, then the two specials.
    """
    lines = gzip.open(bpe_path or _open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"CLIP BPE file {bpe_path!r} gave {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def ensure_clip_bpe_files(cache_dir: str | None = None) -> str:
    """Write ``vocab.json`` + ``merges.txt`` into ``<cache_dir>/clip-bpe-16e6`` (once, atomically); return the folder."""
    folder = os.path.join(cache_dir or default_cache_dir(), _CACHE_SUBDIR)
    vocab_path = os.path.join(folder, "vocab.json")
    merges_path = os.path.join(folder, "merges.txt")
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        return folder
    vocab, merges = clip_vocab_and_merges()
    # merges first: a reader checks both files, and each appears complete or not at all.
    write_bytes_atomic_local(merges_path, ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    write_bytes_atomic_local(vocab_path, json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return folder


def _check_vocab(tokenizer, source: str) -> CLIPTokenizer:
    size = len(tokenizer)
    if size != CLIP_VOCAB_SIZE:
        raise ValueError(
            f"tokenizer loaded from {source!r} has a vocabulary of {size}, expected CLIP's {CLIP_VOCAB_SIZE}; "
            "offline, transformers returns a near-empty tokenizer for a hub id it cannot reach: give a local "
            "diffusers folder, or leave model.pretrained unset to use the built-in CLIP vocabulary"
        )
    return tokenizer


def _from_bpe_folder(folder: str, pad_token: str) -> CLIPTokenizer:
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        merges = [line for line in f.read().split("\n")[1:] if line]
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], pad_token=EOS_TOKEN,
                        model_max_length=TOKENIZER_MAX_LENGTH)
    # Setting the pad token after construction keeps "!" an ordinary vocabulary entry (id 0). Passed to the
    # constructor it would become a special token that splits prompts at every "!" ("8k!!" → "!", "!"), which
    # open_clip's tokenizer, the one SDXL was trained with, does not do.
    tok.pad_token = pad_token
    return _check_vocab(tok, folder)


def load_tokenizers(
    pretrained: str | None = None, cache_dir: str | None = None, *, need_l: bool = True
) -> tuple[CLIPTokenizer | None, CLIPTokenizer]:
    """(tokenizer_l, tokenizer_g). ``pretrained``: a diffusers SDXL folder or hub id with ``tokenizer/`` and
    ``tokenizer_2/``; None → the built-in CLIP vocabulary (cached under ``cache_dir``). ``need_l=False`` skips
    tokenizer 1 (a refiner folder has only ``tokenizer_2/``) and returns None in its place.

    A folder's ``tokenizer_2`` loads as transformers reads it, so its pad "!" is a special token there (the public
    diffusers behaviour); only prompts containing "!" tokenize differently from open_clip then."""
    if pretrained:
        tok_l = None
        if need_l:
            tok_l = _check_vocab(CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer"),
                                 f"{pretrained}/tokenizer")
        tok_g = _check_vocab(CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2"),
                             f"{pretrained}/tokenizer_2")
        return tok_l, tok_g
    folder = ensure_clip_bpe_files(cache_dir)
    tok_l = _from_bpe_folder(folder, PAD_TOKEN_L) if need_l else None
    return tok_l, _from_bpe_folder(folder, PAD_TOKEN_G)


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str], max_length: int = TOKENIZER_MAX_LENGTH) -> torch.Tensor:
    """Token ids [B, max_length]: BOS, tokens, EOS, then the tokenizer's pad token. Longer prompts are cut to
    ``max_length`` (keeping the final EOS) with a logged warning, as CLIP only has 77 positions."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a list of strings, got {type(prompts).__name__}: {prompts!r:.200}")
    prompts = list(prompts)
    full_lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
    for index, length in enumerate(full_lengths):
        if length > max_length:
            logger.warning("prompt %d has %d tokens; truncated to %d: %.120r", index, length, max_length,
                           prompts[index])
    encoded = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return encoded["input_ids"]
