"""Weights on disk: safetensors written atomically, and loading that names what does not fit.

Only two formats are read: safetensors, and ``torch.load(weights_only=True)`` for ``.pt``/``.pth``/``.bin``/``.ckpt``
files, which refuses arbitrary pickled objects. (Object-store uploads are the pipeline's business: ``sdxl/`` writes
to a local folder and the stages copy it with ``pipeline.storage``.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file as _safetensors_load_file
from safetensors.torch import save as _safetensors_save
from torch import nn

from sdxl.atomic_files import write_bytes_atomic_local  # noqa: F401  (tokenizers and callers import it from here)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_MAX_KEYS_IN_ERROR = 5


def _as_state_dict(module_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else dict(module_or_state)
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple[int, int]] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing memory (tied weights): store such a tensor as its own copy.
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and ident in seen_storage:
            tensor = tensor.clone()
        seen_storage.add(ident)
        out[key] = tensor
    return out


def save_state_dict(module_or_state: nn.Module | Mapping[str, torch.Tensor], path: str,
                    metadata: Mapping[str, str] | None = None) -> str:
    """Save a module's (or a state dict's) tensors as ``path`` (.safetensors), atomically. Returns ``path``."""
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"path must end with .safetensors, got {path!r}")
    tensors = _as_state_dict(module_or_state)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    write_bytes_atomic_local(path, _safetensors_save(tensors, metadata=meta or None))
    return path


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``.pt``/``.pth``/``.bin``/``.ckpt`` file (weights_only loading)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return _safetensors_load_file(path, device="cpu")
    if path.endswith(_TORCH_SUFFIXES):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path} does not hold a flat state dict (str → tensor); got {type(obj).__name__}")
        return dict(obj)
    raise ValueError(f"path must be a .safetensors or {'/'.join(_TORCH_SUFFIXES)} file, got {path!r}")


def state_dict_mismatches(module: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Keys the module expects but the file lacks, keys the module lacks, and keys whose shapes differ."""
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    )
    return {"missing": missing, "unexpected": unexpected, "wrong_shape": wrong_shape}


def load_into(module: nn.Module, path: str) -> nn.Module:
    """Load the weights file ``path`` into ``module``; every key and shape must match (error names the file and the
    first mismatching keys, typically a checkpoint from a different preset)."""
    state = load_state_dict_file(path)
    problems = state_dict_mismatches(module, state)
    if any(problems.values()):
        parts = [
            f"{len(keys)} {kind} (first: {', '.join(keys[:_MAX_KEYS_IN_ERROR])})"
            for kind, keys in problems.items()
            if keys
        ]
        raise ValueError(
            f"weights in {path} do not fit {type(module).__name__}: " + "; ".join(parts)
            + " — was it saved from a different preset?"
        )
    module.load_state_dict(state, strict=True)
    return module
