"""Content fingerprints of models: how an index or a cache knows which weights made it."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["hash_tensor", "model_fingerprint"]


def hash_tensor(hasher: Any, name: str, tensor: Tensor) -> None:
    """Feed ``tensor``'s name, dtype, shape and bytes to ``hasher`` (a ``hashlib`` object)."""
    data = tensor.detach().cpu().contiguous()
    hasher.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
    hasher.update(data.reshape(-1).view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """blake2b (16 hex digits) of ``model``'s ``state_dict``: every tensor's name, dtype, shape and bytes.

    Two loads of the same weights give the same fingerprint on any machine; any changed weight changes it. Reads
    every tensor once (about 1 s per GB of weights on CPU).
    """
    hasher = hashlib.blake2b(digest_size=8)
    for name, tensor in model.state_dict().items():
        hash_tensor(hasher, name, tensor)
    return hasher.hexdigest()
