"""Conditioning for the SDXL UNets: text context, pooled vector and micro-conditioning scalars."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sdxl.presets import FOURIER_DIM, TOKENIZER_MAX_LENGTH
from sdxl.tokenizers import tokenize

# What a model sees without text (CFG dropout in training, the default negative at sampling): SPEC, "Classifier-free
# guidance". The base: zero context and pooled; the refiner: the encoding of "".
UNCONDITIONAL_ZEROS = "zeros"
UNCONDITIONAL_EMPTY_PROMPT = "empty_prompt"
UNCONDITIONAL_KINDS = (UNCONDITIONAL_ZEROS, UNCONDITIONAL_EMPTY_PROMPT)


def default_unconditional_kind(kind: str) -> str:
    """The unconditional input a model of ``kind`` ("base" | "refiner") is trained and sampled with."""
    if kind not in ("base", "refiner"):
        raise ValueError(f"kind must be 'base' or 'refiner', got {kind!r}")
    return UNCONDITIONAL_ZEROS if kind == "base" else UNCONDITIONAL_EMPTY_PROMPT


def resolve_unconditional_kind(recorded: str | None, kind: str, where: str = "recorded value") -> str:
    """``recorded`` (what weights say they were trained with) checked, or the default of ``kind`` when None."""
    if recorded is None:
        return default_unconditional_kind(kind)
    if recorded not in UNCONDITIONAL_KINDS:
        raise ValueError(f"{where}: unconditional={recorded!r} is not one of {list(UNCONDITIONAL_KINDS)}")
    return recorded


@dataclass
class Conditioning:
    """What a UNet call needs besides the noisy latents and the timestep.

    ``time_ids`` holds the micro-conditioning scalars in the order the public checkpoints use:
    base ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``, refiner
    ``(orig_h, orig_w, crop_top, crop_left, aesthetic_score)``. The UNet embeds each scalar with 256-dim Fourier
    features and concatenates them after ``pooled`` (diffusers' ``addition_embed_type="text_time"``).
    """

    context: torch.Tensor  # [B, 77, C] cross-attention tokens (C = 2048 base, 1280 refiner at full size)
    pooled: torch.Tensor  # [B, P] pooled, projected bigG text embedding
    time_ids: torch.Tensor  # [B, 6] base or [B, 5] refiner

    def unet_kwargs(self) -> dict:
        return {
            "encoder_hidden_states": self.context,
            "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids},
        }

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning(
            context=self.context.to(device=device, dtype=dtype),
            pooled=self.pooled.to(device=device, dtype=dtype),
            time_ids=self.time_ids.to(device=device, dtype=dtype),
        )

    def cat(self, other: "Conditioning") -> "Conditioning":
        """Batch-concatenate (used to run conditional and unconditional passes in one UNet call)."""
        return Conditioning(
            context=torch.cat([self.context, other.context]),
            pooled=torch.cat([self.pooled, other.pooled]),
            time_ids=torch.cat([self.time_ids, other.time_ids]),
        )

    def repeat(self, n: int) -> "Conditioning":
        """Repeat each sample ``n`` times along the batch (several images per prompt)."""
        return Conditioning(
            context=self.context.repeat_interleave(n, dim=0),
            pooled=self.pooled.repeat_interleave(n, dim=0),
            time_ids=self.time_ids.repeat_interleave(n, dim=0),
        )


# ----------------------------------------------------------------------------------------------------------------
# Micro-conditioning (Sec. 2.2): time_ids and their Fourier features
# ----------------------------------------------------------------------------------------------------------------


def fourier_features(time_ids: torch.Tensor, dim: int = FOURIER_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of every scalar of ``time_ids`` [B, n] → [B, n*dim], concatenated per sample.

    Reproduces the UNet's ``add_time_proj`` (diffusers ``Timesteps(dim, flip_sin_to_cos=True, freq_shift=0)``):
    frequencies ``exp(-ln(max_period) * k / (dim/2))``, cosines first, then sines.
    """
    if time_ids.ndim != 2:
        raise ValueError(f"time_ids must be [batch, n], got shape {tuple(time_ids.shape)}")
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=time_ids.device) / half
    angles = time_ids.flatten().float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return emb.reshape(time_ids.shape[0], -1)


def vector_conditioning(pooled: torch.Tensor, time_ids: torch.Tensor, dim: int = FOURIER_DIM) -> torch.Tensor:
    """What the UNet's ``add_embedding`` receives: pooled ‖ Fourier(each time id) (2816 base / 2560 refiner)."""
    return torch.cat([pooled, fourier_features(time_ids, dim).to(pooled.dtype)], dim=-1)


def _as_float(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32)
    return torch.as_tensor(value, dtype=torch.float32, device=device)


def _pairs(value: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    """A pair [2] (shared by the batch) or per-sample pairs [B, 2] → [B, 2]."""
    if value.ndim == 1 and value.shape[0] == 2:
        value = value[None].expand(batch, 2)
    if value.ndim != 2 or value.shape[1] != 2:
        raise ValueError(f"{name} must be a (height, width)-style pair or a [batch, 2] tensor, "
                         f"got shape {tuple(value.shape)}")
    if value.shape[0] != batch:
        raise ValueError(f"{name} has {value.shape[0]} rows but the batch has {batch}")
    return value


def _scalars(value: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    """A number (shared by the batch) or per-sample numbers [B] → [B, 1]."""
    if value.ndim == 0:
        value = value.expand(batch)
    if value.ndim != 1 or value.shape[0] != batch:
        raise ValueError(f"{name} must be a number or a [batch] tensor (batch {batch}), got shape {tuple(value.shape)}")
    return value[:, None]


def _batch_size(batch_size: int | None, pairs: list[torch.Tensor], scalars: list[torch.Tensor]) -> int:
    """The batch implied by per-sample values and/or ``batch_size`` (1 when everything is shared)."""
    sizes = {v.shape[0] for v in pairs if v.ndim == 2}
    sizes |= {v.shape[0] for v in scalars if v.ndim == 1}
    if batch_size is not None:
        sizes.add(int(batch_size))
    if len(sizes) > 1:
        raise ValueError(f"batch_size / per-sample micro-conditioning disagree on the batch size: {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def base_time_ids(original_size, crop_coords, target_size, batch_size: int | None = None, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 6] = (orig_h, orig_w, crop_top, crop_left, target_h, target_w); each argument a pair, shared by the batch,
    or per-sample pairs ([B, 2] tensor or list of pairs)."""
    named = {"original_size": original_size, "crop_coords": crop_coords, "target_size": target_size}
    values = {name: _as_float(value, device) for name, value in named.items()}
    batch = _batch_size(batch_size, list(values.values()), [])
    return torch.cat([_pairs(value, name, batch) for name, value in values.items()], dim=1).to(dtype)


def refiner_time_ids(original_size, crop_coords, aesthetic_score, batch_size: int | None = None, device=None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 5] = (orig_h, orig_w, crop_top, crop_left, aesthetic_score); ``aesthetic_score`` a number or [B]."""
    size, crop = _as_float(original_size, device), _as_float(crop_coords, device)
    score = _as_float(aesthetic_score, device)
    batch = _batch_size(batch_size, [size, crop], [score])
    parts = [_pairs(size, "original_size", batch), _pairs(crop, "crop_coords", batch),
             _scalars(score, "aesthetic_score", batch)]
    return torch.cat(parts, dim=1).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Text conditioning and classifier-free-guidance dropout
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TextEmbeddings:
    """Each text encoder's output before concatenation (the unit CFG dropout acts on)."""

    context_g: torch.Tensor  # [B, 77, Cg] bigG penultimate hidden states
    pooled_g: torch.Tensor  # [B, P] bigG projected pooled output
    context_l: torch.Tensor | None = None  # [B, 77, Cl] CLIP-L penultimate hidden states (base only)

    @property
    def context(self) -> torch.Tensor:
        """Cross-attention tokens: CLIP-L ‖ bigG on channels for the base, bigG alone for the refiner."""
        if self.context_l is None:
            return self.context_g
        return torch.cat([self.context_l, self.context_g], dim=-1)

    def slice(self, start: int, stop: int) -> "TextEmbeddings":
        return TextEmbeddings(self.context_g[start:stop], self.pooled_g[start:stop],
                              None if self.context_l is None else self.context_l[start:stop])


def _replace_where(mask: torch.Tensor, values: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    shape = (mask.shape[0],) + (1,) * (values.ndim - 1)
    return torch.where(mask.view(shape), empty.to(values.dtype).expand_as(values), values)


def drop_text_conditioning(embeddings: TextEmbeddings, empty: TextEmbeddings, p: float = 0.1,
                           generator: torch.Generator | None = None, joint: bool = False) -> TextEmbeddings:
    """Classifier-free-guidance dropout: per sample and independently per encoder, with probability ``p``, replace
    that encoder's conditioning (CLIP-L: context; bigG: context and pooled) by its part of ``empty``, the model's
    unconditional text (batch 1; :meth:`TextConditioner.unconditional_text`: zeros for the base, the encoding of ""
    for the refiner). Micro-conditioning is not touched here: size/crop/target keep their values (docs/decisions.md).

    ``joint=True`` drops both encoders together (one draw per sample): the whole unconditional input that guidance
    uses is then seen in ``p`` of the samples, not ``p²`` (1% at 0.1), which a briefly trained model needs.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (the CFG dropout rate) must be in [0, 1], got {p}")
    batch = embeddings.context_g.shape[0]
    rng_device = generator.device if generator is not None else "cpu"
    device = embeddings.context_g.device
    drop_g = (torch.rand(batch, generator=generator, device=rng_device) < p).to(device)
    drop_l = drop_g if joint else (torch.rand(batch, generator=generator, device=rng_device) < p).to(device)
    context_l = None
    if embeddings.context_l is not None:
        if empty.context_l is None:
            raise ValueError("empty embeddings lack context_l while the batch has one")
        context_l = _replace_where(drop_l, embeddings.context_l, empty.context_l)
    return TextEmbeddings(
        context_g=_replace_where(drop_g, embeddings.context_g, empty.context_g),
        pooled_g=_replace_where(drop_g, embeddings.pooled_g, empty.pooled_g),
        context_l=context_l,
    )


def _prompt_list(prompts, name: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompts!r:.200}")
    return prompts


def _negative_list(negative_prompt, batch: int) -> list[str | None]:
    """One negative per prompt: ``None`` (the model's unconditional input) or a string, broadcast from one value."""
    if negative_prompt is None or isinstance(negative_prompt, str):
        return [negative_prompt] * batch
    negatives = list(negative_prompt)
    if not all(n is None or isinstance(n, str) for n in negatives):
        raise ValueError(f"negative_prompt must be None, a string, or a list of strings / None, "
                         f"got {negatives!r:.200}")
    if len(negatives) == 1:
        negatives = negatives * batch
    if len(negatives) != batch:
        raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {batch}")
    return negatives


def _zeros_like(text: TextEmbeddings) -> TextEmbeddings:
    return TextEmbeddings(torch.zeros_like(text.context_g), torch.zeros_like(text.pooled_g),
                          None if text.context_l is None else torch.zeros_like(text.context_l))


class TextConditioner(nn.Module):
    """SDXL's text side: both tokenizers and encoders → context and pooled vector, plus micro-conditioning.

    ``kind="base"``: context = CLIP-L penultimate ‖ bigG penultimate hidden states (768 + 1280 = 2048 at full),
    pooled = bigG's projected pooled output (``text_embeds``, 1280). ``kind="refiner"``: bigG only (context 1280).

    The model's *unconditional input* (SPEC, "Classifier-free guidance") is what CFG dropout replaces the text by in
    training and what sampling uses when no negative prompt is given (``negative_prompt=None``):
    ``force_zeros_for_empty_prompt=True`` (the base's default, as the public base's diffusers config says) — zero
    context and pooled vectors, sgm's non-legacy conditioner; ``False`` (the refiner's default) — the encoding of "".
    The flag keeps diffusers' name and meaning, so an exported config states what the model was trained with. An
    explicit negative prompt, ``""`` included, is always encoded (diffusers zeroes only a missing one).
    """

    def __init__(self, tokenizer_l, text_encoder_l, tokenizer_g, text_encoder_g, kind: str = "base",
                 force_zeros_for_empty_prompt: bool | None = None, max_length: int = TOKENIZER_MAX_LENGTH):
        super().__init__()
        if kind not in ("base", "refiner"):
            raise ValueError(f"kind must be 'base' or 'refiner', got {kind!r}")
        if kind == "base" and (tokenizer_l is None or text_encoder_l is None):
            raise ValueError("kind='base' needs tokenizer_l and text_encoder_l (CLIP ViT-L)")
        self.kind = kind
        self.tokenizer_l = tokenizer_l if kind == "base" else None
        self.tokenizer_g = tokenizer_g
        self.text_encoder_l = text_encoder_l if kind == "base" else None
        self.text_encoder_g = text_encoder_g
        self.max_length = max_length
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = default_unconditional_kind(kind) == UNCONDITIONAL_ZEROS
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @classmethod
    def from_components(cls, components, kind: str = "base", **kwargs) -> "TextConditioner":
        """From an ``sdxl.models.SDXLComponents``."""
        return cls(components.tokenizer_l, components.text_encoder_l, components.tokenizer_g,
                   components.text_encoder_g, kind=kind, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder_g.parameters()).device

    @property
    def unconditional_kind(self) -> str:
        """``"zeros"`` or ``"empty_prompt"``: what the model sees without text (recorded with trained weights)."""
        return UNCONDITIONAL_ZEROS if self.force_zeros_for_empty_prompt else UNCONDITIONAL_EMPTY_PROMPT

    def unconditional_text(self, batch: int = 1) -> TextEmbeddings:
        """The model's unconditional text for ``batch`` samples: zeros, or the encoding of "" (see the class)."""
        empty = self.encode_text([""])
        if self.force_zeros_for_empty_prompt:
            empty = _zeros_like(empty)
        return TextEmbeddings(*(None if t is None else t.expand(batch, *t.shape[1:])
                                for t in (empty.context_g, empty.pooled_g, empty.context_l)))

    def _run(self, tokenizer, encoder, prompts: list[str], with_pooled: bool):
        ids = tokenize(tokenizer, prompts, self.max_length).to(self.device)
        out = encoder(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-2]  # penultimate layer, as SDXL (Sec. 2.1)
        return hidden, (out.text_embeds if with_pooled else None)

    def encode_text(self, prompts, grad: bool = False) -> TextEmbeddings:
        """Per-encoder embeddings of ``prompts`` (no grad unless ``grad=True``)."""
        prompts = _prompt_list(prompts, "prompt")
        with torch.set_grad_enabled(grad):
            context_g, pooled_g = self._run(self.tokenizer_g, self.text_encoder_g, prompts, with_pooled=True)
            context_l = None
            if self.kind == "base":
                context_l, _ = self._run(self.tokenizer_l, self.text_encoder_l, prompts, with_pooled=False)
        return TextEmbeddings(context_g=context_g, pooled_g=pooled_g, context_l=context_l)

    def encode(self, prompts, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, 77, C], pooled [B, P])."""
        emb = self.encode_text(prompts, grad=grad)
        return emb.context, emb.pooled_g

    def time_ids(self, batch: int, original_size, crop_coords, target_size=None, aesthetic_score=None
                 ) -> torch.Tensor:
        if self.kind == "base":
            if target_size is None:
                raise ValueError("target_size is required for the base model's micro-conditioning")
            return base_time_ids(original_size, crop_coords, target_size, batch, self.device)
        if aesthetic_score is None:
            raise ValueError("aesthetic_score is required for the refiner's micro-conditioning")
        return refiner_time_ids(original_size, crop_coords, aesthetic_score, batch, self.device)

    def encode_for_training(self, prompts, original_size, crop_coords, target_size=None, aesthetic_score=None,
                            ucg_rate: float = 0.1, generator: torch.Generator | None = None,
                            ucg_joint: bool = False) -> Conditioning:
        """Conditioning of a training batch with CFG dropout at ``ucg_rate`` (see :func:`drop_text_conditioning`).
        Micro-conditioning: per-sample [B, 2] tensors (or pairs shared by the batch); ``target_size`` for the base,
        ``aesthetic_score`` (number or [B]) for the refiner."""
        prompts = _prompt_list(prompts, "prompt")
        batch = len(prompts)
        if self.force_zeros_for_empty_prompt:
            text = self.encode_text(prompts)
            unconditional = _zeros_like(text.slice(0, 1))
        else:  # "" rides along in the same forward pass: always consistent with the current encoder weights
            both = self.encode_text(prompts + [""])
            text, unconditional = both.slice(0, batch), both.slice(batch, batch + 1)
        if ucg_rate > 0:
            text = drop_text_conditioning(text, unconditional, ucg_rate, generator, joint=ucg_joint)
        time_ids = self.time_ids(batch, original_size, crop_coords, target_size, aesthetic_score)
        return Conditioning(context=text.context, pooled=text.pooled_g, time_ids=time_ids)

    def encode_for_sampling(self, prompt, negative_prompt=None, original_size=(1024, 1024), crop_coords=(0, 0),
                            target_size=None, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                            negative_original_size=None, negative_crop_coords=None, negative_target_size=None,
                            num_images_per_prompt: int = 1) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) for classifier-free guidance, each of batch ``len(prompt) * num_images_per_prompt``.

        ``negative_prompt``: ``None`` (default) = the model's unconditional input (zeros for the base, the encoding
        of "" for the refiner: what training dropped the text to); a string (``""`` included) is encoded; a list
        gives one per prompt and may mix both. ``target_size`` defaults to ``original_size``; the negative
        micro-conditioning defaults to the positive one (diffusers' convention), except the refiner's aesthetic
        score (6.0 vs 2.5, Sec. 2.5)."""
        prompts = _prompt_list(prompt, "prompt")
        batch = len(prompts)
        negatives = _negative_list(negative_prompt, batch)
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        target_size = original_size if target_size is None else target_size

        context, pooled = self.encode(prompts)
        zeroed = [n is None and self.force_zeros_for_empty_prompt for n in negatives]
        texts = ["" if n is None else n for n in negatives]
        if all(zeroed):
            neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        else:
            neg_context, neg_pooled = self.encode(texts)
            zero = torch.tensor(zeroed, device=neg_context.device)
            neg_context = torch.where(zero.view(-1, 1, 1), torch.zeros_like(neg_context), neg_context)
            neg_pooled = torch.where(zero.view(-1, 1), torch.zeros_like(neg_pooled), neg_pooled)

        cond_ids = self.time_ids(batch, original_size, crop_coords, target_size, aesthetic_score)
        uncond_ids = self.time_ids(
            batch,
            original_size if negative_original_size is None else negative_original_size,
            crop_coords if negative_crop_coords is None else negative_crop_coords,
            target_size if negative_target_size is None else negative_target_size,
            negative_aesthetic_score,
        )
        cond = Conditioning(context=context, pooled=pooled, time_ids=cond_ids)
        uncond = Conditioning(context=neg_context, pooled=neg_pooled, time_ids=uncond_ids)
        return cond.repeat(num_images_per_prompt), uncond.repeat(num_images_per_prompt)
