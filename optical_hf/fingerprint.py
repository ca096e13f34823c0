"""Content fingerprints of models: how an index or a cache knows which weights made it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["fingerprint_tensors", "hash_tensor", "model_fingerprint"]


def hash_tensor(hasher: Any, name: str, tensor: Tensor) -> None:
    """Feed ``tensor``'s name, dtype, shape and bytes to ``hasher`` (a ``hashlib`` object)."""
    data = tensor.detach().cpu().contiguous()
    hasher.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
    hasher.update(data.reshape(-1).view(torch.uint8).numpy())


UNUSED_HEADS = re.compile(r"(^|\.)pooler\.")
"""State-dict keys left out of fingerprints: the transformers pooler head (``BertModel.pooler`` ...), whose output
sentence-transformers never uses (its ``Pooling`` module pools the token states) and which ``from_pretrained``
initialises at random when a checkpoint lacks it (multilingual-e5-small does): hashing it would give every load of
the same model another fingerprint."""


def fingerprint_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of ``model``'s ``state_dict`` that determine its token states (without :data:`UNUSED_HEADS`)."""
    return ((name, tensor) for name, tensor in model.state_dict().items() if not UNUSED_HEADS.search(name))


def model_fingerprint(model: nn.Module) -> str:
    """blake2b (16 hex digits) of ``model``'s weights (:func:`fingerprint_tensors`): each tensor's name, dtype, shape
    and bytes.

    Two loads of the same weights give the same fingerprint on any machine; any changed weight changes it. Reads
    every tensor once (about 1 s per GB of weights on CPU).
    """
    hasher = hashlib.blake2b(digest_size=8)
    for name, tensor in fingerprint_tensors(model):
        hash_tensor(hasher, name, tensor)
    return hasher.hexdigest()
