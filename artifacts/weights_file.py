"""A program's weights for one rank: one safetensors file, tensors under their post-pass names.

Tied tensors (an LM head that is the embedding) are stored once: safetensors refuses shared
storage, so the aliases are listed in the header's metadata under TIED_WEIGHTS_KEY and restored as
the same tensor on reading. The runtime reads these files with its own verified streaming loader
(runtime/weights_loader.py); the build's verifier reads them back with safetensors' own.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TIED_WEIGHTS_KEY = "tied_weights"


def write_weights(path: Path, constants: dict[str, torch.Tensor]) -> None:
    """Saves each distinct tensor once; names that share storage with an earlier one are aliases."""
    unique, tied, seen = {}, {}, {}
    for name in sorted(constants):
        t = constants[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.contiguous().cpu()
    save_file(unique, str(path), metadata={TIED_WEIGHTS_KEY: json.dumps(tied)})


def restore_ties(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    for alias, source in json.loads(metadata.get(TIED_WEIGHTS_KEY, "{}")).items():
        tensors[alias] = tensors[source]
    return tensors


def read_weights(path: Path, device: str) -> dict[str, torch.Tensor]:
    """The file's tensors by name, aliases restored, through safetensors (no digest check)."""
    with safe_open(str(path), framework="pt", device=device) as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = f.metadata() or {}
    return restore_ties(tensors, metadata)
