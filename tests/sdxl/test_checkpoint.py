"""Weights on disk: atomic safetensors, safe loading only, clear mismatch errors."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from sdxl.checkpoint import load_into, load_state_dict_file, save_state_dict, write_bytes_atomic_local


def _net(width: int = 4) -> nn.Module:
    torch.manual_seed(width)
    return nn.Sequential(nn.Linear(3, width), nn.GELU(), nn.Linear(width, 2))


def test_round_trip_is_exact_and_leaves_no_temporary_files(tmp_path):
    net = _net()
    path = save_state_dict(net, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"step": 7})
    assert os.listdir(tmp_path / "ckpt") == ["model.safetensors"]
    other = load_into(_net(4).apply(lambda m: nn.init.zeros_(m.weight) if isinstance(m, nn.Linear) else None), path)
    for key, value in net.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)


def test_shape_mismatch_names_the_file_and_keys(tmp_path):
    path = save_state_dict(_net(4), str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError) as info:
        load_into(_net(8), path)
    message = str(info.value)
    assert "small.safetensors" in message and "0.weight" in message and "wrong_shape" in message


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    state = _net().state_dict()
    state.pop("2.bias")
    state["extra.weight"] = torch.zeros(1)
    path = save_state_dict(state, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing \(first: 2\.bias\).*1 unexpected \(first: extra\.weight\)"):
        load_into(_net(), path)


def test_torch_files_load_with_weights_only(tmp_path):
    net = _net()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    loaded = load_state_dict_file(str(tmp_path / "model.pt"))
    assert torch.equal(loaded["0.weight"], net.state_dict()["0.weight"])
    # An arbitrary pickled object is refused by weights_only loading.
    torch.save({"net": net}, tmp_path / "pickle.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        load_state_dict_file(str(tmp_path / "pickle.bin"))
    # A non-flat but safe payload is refused with a clear message.
    torch.save({"model": net.state_dict(), "step": 3}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="flat state dict"):
        load_state_dict_file(str(tmp_path / "nested.pt"))


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_state_dict_file(str(tmp_path / "nothing.safetensors"))
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.npz"):
        load_state_dict_file(str(tmp_path / "weights.npz"))
    with pytest.raises(ValueError, match="safetensors"):
        save_state_dict(_net(), str(tmp_path / "model.pt"))


def test_tied_weights_are_saved(tmp_path):
    net = _net()
    state = {"a": net[0].weight, "b": net[0].weight}  # same storage twice
    path = save_state_dict(state, str(tmp_path / "tied.safetensors"))
    loaded = load_state_dict_file(path)
    assert torch.equal(loaded["a"], loaded["b"])


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "f.bin"
    write_bytes_atomic_local(str(target), b"first version")
    write_bytes_atomic_local(str(target), b"2nd")
    assert target.read_bytes() == b"2nd" and os.listdir(tmp_path) == ["f.bin"]
