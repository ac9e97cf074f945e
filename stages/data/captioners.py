"""Synthetic captions for the caption stage: OpenCLIP CoCa or BLIP, chosen by ``captioner.kind``.

CoCa is decoded greedily here rather than with ``CoCa.generate``: open_clip's generate needs transformers'
``BeamSearchScorer``, which transformers 5 no longer has (open_clip then refuses to generate at all). Greedy decoding
is also deterministic, which a resumable data pipeline wants. BLIP uses transformers' ``generate`` with greedy search.

Weights: CoCa from an open_clip tag or checkpoint file (``captioner.pretrained``), BLIP from a hub id or a local
folder (``captioner.model``). Random CoCa weights only with ``captioner.random_init_ok`` (tests, demos).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from stages.data.scorers import build_open_clip, resolve_device

KINDS = ("coca", "blip")
MIN_NEW_TOKENS = 1


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class CocaBackend:
    """Greedy decoding of an open_clip CoCa model, one image batch at a time."""

    def __init__(self, model, preprocess, tokenizer, device: torch.device, max_new_tokens: int):
        self.model, self.preprocess, self.tokenizer = model.to(device).eval(), preprocess, tokenizer
        self.device, self.max_new_tokens = device, max_new_tokens
        self.sot_id = int(getattr(tokenizer, "sot_token_id", 49406))
        self.eot_id = int(getattr(tokenizer, "eot_token_id", 49407))
        self.context_length = int(getattr(model, "context_length", None) or getattr(tokenizer, "context_length", 77))

    @classmethod
    def from_config(cls, section: Any, device: torch.device, max_new_tokens: int) -> "CocaBackend":
        model, preprocess, tokenizer = build_open_clip(section, "captioner")
        if not hasattr(model, "text_decoder"):
            raise ValueError(f"captioner.arch={section.get('arch')!r} is not a CoCa model (it has no text decoder)")
        return cls(model, preprocess, tokenizer, device, max_new_tokens)

    @torch.no_grad()
    def generate(self, images: list) -> list[str]:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        image_latent, image_embs = self.model._encode_image(pixels)
        tokens = torch.full((len(images), 1), self.sot_id, dtype=torch.long, device=self.device)
        finished = torch.zeros(len(images), dtype=torch.bool, device=self.device)
        for step in range(self.max_new_tokens):
            window = tokens[:, -(self.context_length - 1):]  # the text tower's positions (one is its CLS token)
            logits = self.model(pixels, window, image_latent=image_latent, image_embs=image_embs,
                                output_labels=False)["logits"][:, -1].clone()
            logits[:, self.sot_id] = float("-inf")  # a caption never restarts
            if step < MIN_NEW_TOKENS:  # no empty caption: at least one word before the end token
                logits[:, self.eot_id] = float("-inf")
            next_token = torch.where(finished, torch.full_like(finished, self.eot_id, dtype=torch.long),
                                     logits.argmax(dim=-1))
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            finished |= next_token == self.eot_id
            if bool(finished.all()):
                break
        return [self._decode(row) for row in tokens[:, 1:].tolist()]

    def _decode(self, ids: list[int]) -> str:
        if self.eot_id in ids:
            ids = ids[:ids.index(self.eot_id)]
        decode = getattr(self.tokenizer, "decode", None) or self.tokenizer.tokenizer.decode
        return _clean(decode(ids))


class BlipBackend:
    """transformers BLIP captioning (``BlipForConditionalGeneration`` + ``BlipProcessor``), greedy search."""

    def __init__(self, model, processor, device: torch.device, max_new_tokens: int):
        self.model, self.processor = model.to(device).eval(), processor
        self.device, self.max_new_tokens = device, max_new_tokens

    @classmethod
    def from_config(cls, section: Any, device: torch.device, max_new_tokens: int) -> "BlipBackend":
        from transformers import BlipForConditionalGeneration, BlipProcessor

        source = section.get("model")
        if not source:
            raise ValueError("captioner.model is not set: give a BLIP hub id (e.g. "
                             "Salesforce/blip-image-captioning-large) or a local folder for captioner.kind=blip")
        if str(source).startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(str(source))):
            raise FileNotFoundError(f"captioner.model: no BLIP model folder at {source}")
        try:
            processor = BlipProcessor.from_pretrained(str(source))
            model = BlipForConditionalGeneration.from_pretrained(str(source))
        except (OSError, ValueError) as err:  # ValueError: huggingface_hub's invalid repo id
            raise FileNotFoundError(f"captioner.model: cannot load BLIP from {source!r}: {err}") from err
        return cls(model, processor, device, max_new_tokens)

    @torch.no_grad()
    def generate(self, images: list) -> list[str]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        ids = self.model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=self.max_new_tokens,
                                  min_new_tokens=MIN_NEW_TOKENS, do_sample=False, num_beams=1)
        return [_clean(text) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


class Captioner:
    """``caption(images) -> list[str]``: one caption per RGB image, batched, under ``torch.no_grad``."""

    def __init__(self, backend, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"captioner.batch_size must be >= 1, got {batch_size}")
        self.backend, self.batch_size = backend, batch_size

    @classmethod
    def from_config(cls, section: Any) -> "Captioner":
        kind = str(section.get("kind", "coca"))
        if kind not in KINDS:
            raise ValueError(f"captioner.kind must be one of {KINDS}, got {kind!r}")
        max_new_tokens = int(section.get("max_new_tokens", 20))
        if max_new_tokens < 1:
            raise ValueError(f"captioner.max_new_tokens must be >= 1, got {max_new_tokens}")
        device = resolve_device(section.get("device"))
        backend_cls = CocaBackend if kind == "coca" else BlipBackend
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(section.get("seed", 0)))
            backend = backend_cls.from_config(section, device, max_new_tokens)
        return cls(backend, int(section.get("batch_size", 8)))

    def caption(self, images: list) -> list[str]:
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            texts = self.backend.generate(batch)
            if len(texts) != len(batch):
                raise RuntimeError(f"captioner returned {len(texts)} captions for {len(batch)} images")
            captions.extend(texts)
        return captions
