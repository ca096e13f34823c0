"""Batching and OT marginals of both front ends: which tokens of a bitext pair carry mass, and how batches are built.

One rule per concept, shared by :class:`optical_hf.OTDistillationLoss` (sentence-transformers) and
:class:`optical_hf.OTDistillationTrainer` (``transformers.Trainer``):

* content tokens (``marginals="content"``): real tokens that are neither special (:func:`special_token_ids`: not
  ``[UNK]``) nor part of the prompt (:func:`content_mask`);
* pooling weights (``marginals="pooling"``): exactly those a ``Pooling`` module averages with (:func:`pooling_weights`).

The collator of both front ends: :class:`OTDistillationDataCollator` (the English column goes through the teacher's
tokenizer or the teacher cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
from sentence_transformers.sentence_transformer.modules import Pooling
from torch import Tensor

from .errors import OpticalInputError
from .ot import uniform_weights
from .teacher_cache import TeacherCache

__all__ = [
    "TEACHER_TASK",
    "WEIGHTED_POOLING_MODES",
    "OTDistillationDataCollator",
    "content_mask",
    "pooling_setup",
    "pooling_weights",
    "special_token_ids",
]

TEACHER_TASK = "optical_teacher"
"""Task name that :class:`OTDistillationDataCollator` stamps on the column it tokenizes with the teacher."""

WEIGHTED_POOLING_MODES = ("mean", "mean_sqrt_len_tokens", "cls", "lasttoken", "weightedmean")
"""Pooling modes that average tokens with fixed weights, i.e. that ``marginals="pooling"`` supports."""


def special_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's special token ids that carry no content: ``all_special_ids`` without the unknown token.

    ``[UNK]`` / ``<unk>`` stands for a real word the vocabulary cannot spell (frequent in low-resource scripts), so it
    keeps its OT mass. A raw ``tokenizers.Tokenizer`` (sentence-transformers' ``StaticEmbedding`` models) has no
    ``all_special_ids``: its special tokens are the added tokens marked special.
    """
    if not hasattr(tokenizer, "all_special_ids"):
        unk = getattr(tokenizer.model, "unk_token", None)
        unk_id = tokenizer.token_to_id(unk) if unk else None
        return [i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special and i != unk_id]
    return [i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id]


def content_mask(
    input_ids: Tensor,
    attention_mask: Tensor,
    special_ids: Iterable[int] = (),
    prompt_length: int | Tensor | None = None,
) -> Tensor:
    """Tokens that carry the sentence's content: real, not special, not part of the prompt.

    Args:
        input_ids: ``(batch, n)`` token ids.
        attention_mask: ``(batch, n)`` 1 for real tokens, 0 for padding.
        special_ids: ids to exclude (:func:`special_token_ids`); empty to keep them.
        prompt_length: number of leading positions taken by the prompt (``features["prompt_length"]`` from
            sentence-transformers' ``preprocess``); ``None`` or 0 for no prompt.

    Returns:
        ``(batch, n)`` bool mask. Rows that would be empty fall back to ``attention_mask``.
    """
    real = attention_mask.bool()
    mask = real.clone()
    special_ids = list(special_ids)
    if special_ids:
        mask &= ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    if prompt_length is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask &= positions.unsqueeze(0) >= torch.as_tensor(prompt_length, device=input_ids.device).reshape(-1, 1)
    return torch.where(mask.any(dim=1, keepdim=True), mask, real)


def pooling_weights(
    attention_mask: Tensor,
    pooling_mode: str = "mean",
    prompt_length: int | Tensor | None = None,
    include_prompt: bool = True,
) -> Tensor:
    """The weights a pooling layer averages token embeddings with, as OT marginals.

    Mirrors sentence-transformers' ``Pooling`` (padded inputs, right or left padding): with ``include_prompt=False``
    the ``prompt_length`` positions after the first real token are dropped, ``"mean"`` (and ``"mean_sqrt_len_tokens"``,
    the same direction) weighs every remaining real token equally (special and prompt tokens included), ``"cls"`` takes
    the first remaining token, ``"lasttoken"`` the last, ``"weightedmean"`` weighs position ``k`` (from the first real
    token, counting from 1) by ``k``. ``(weights[:, :, None] * tokens).sum(1)`` is then the pooled embedding.

    Args:
        attention_mask: ``(batch, n)`` 1 for real tokens, 0 for padding.
        pooling_mode: the ``Pooling`` module's ``pooling_mode`` (one mode; ``"max"`` has no weights).
        prompt_length: leading prompt positions (``features["prompt_length"]``), an int or a tensor broadcastable to
            ``(batch, 1)``; used only when ``include_prompt`` is False.
        include_prompt: the ``Pooling`` module's ``include_prompt``.

    Returns:
        ``(batch, n)`` float32 weights, each row summing to 1 (all 0 for a row with no pooled token).
    """
    real = attention_mask.bool()
    positions = torch.arange(real.shape[1], device=real.device).unsqueeze(0)
    first = real.int().argmax(dim=1, keepdim=True)
    pooled = real
    if not include_prompt and prompt_length is not None:
        prompt = torch.as_tensor(prompt_length, device=real.device).reshape(-1, 1)
        pooled = real & (positions >= first + prompt)
    if pooling_mode in ("mean", "mean_sqrt_len_tokens"):
        weights = pooled.float()
    elif pooling_mode == "cls":
        weights = (positions == pooled.int().argmax(dim=1, keepdim=True)).float() * pooled
    elif pooling_mode == "lasttoken":
        last = real.shape[1] - 1 - pooled.int().flip(1).argmax(dim=1, keepdim=True)
        weights = (positions == last).float() * pooled
    elif pooling_mode == "weightedmean":
        weights = (positions - first + 1).float() * pooled
    else:
        raise OpticalInputError(
            f"marginals='pooling' supports the pooling modes {WEIGHTED_POOLING_MODES}, got {pooling_mode!r}"
        )
    return uniform_weights(pooled, weights)


def pooling_setup(model: SentenceTransformer, side: str) -> tuple[str, bool]:
    """``(pooling_mode, include_prompt)`` of the model's one ``Pooling`` module (for ``marginals="pooling"``)."""
    poolings = [module for module in model.modules() if isinstance(module, Pooling)]
    if len(poolings) != 1:
        raise OpticalInputError(
            f"marginals='pooling' needs exactly one Pooling module in the {side}, found {len(poolings)}"
        )
    mode = poolings[0].pooling_mode
    if mode not in WEIGHTED_POOLING_MODES:
        raise OpticalInputError(
            f"marginals='pooling' supports the pooling modes {WEIGHTED_POOLING_MODES}, got {mode!r} ({side})"
        )
    return mode, poolings[0].include_prompt


@dataclass
class OTDistillationDataCollator(SentenceTransformerDataCollator):
    """sentence-transformers collator that tokenizes the English column with the teacher's own tokenizer.

    The column at ``teacher_column`` (position among the text columns, default 1: the English side) goes through
    ``teacher_preprocess_fn``; every other column through ``preprocess_fn`` (the student's). The teacher column is
    stamped with the task :data:`TEACHER_TASK` so :class:`optical_hf.OTDistillationLoss` can check it. ``prompts``
    work per column as in sentence-transformers.

    With ``teacher_cache`` (a :class:`optical_hf.teacher_cache.TeacherCache` built with the English column's
    prompt), the teacher column is looked up instead: ``input_ids``, ``attention_mask`` ``(batch, m)``,
    ``token_embeddings`` ``(batch, m, dim)`` and ``sentence_embedding`` ``(batch, dim)`` (fp16), so the loss skips
    the teacher forward. A batch with a text missing from the cache is tokenized for the online teacher instead.

    Example::

        collator = OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess, prompts=args.prompts)
    """

    teacher_preprocess_fn: Callable | None = None
    teacher_column: int = 1
    teacher_cache: TeacherCache | None = field(default=None, repr=False)
    auxiliary: frozenset[str] = frozenset()
    """Names of the datasets (multi-dataset training) that are not bitext: their batches are collated as
    sentence-transformers does, every column by the student."""
    _student_preprocess_fn: Callable | None = field(default=None, init=False, repr=False)
    _dataset: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.teacher_preprocess_fn is None:
            raise ValueError("OTDistillationDataCollator needs `teacher_preprocess_fn` (e.g. teacher.preprocess)")
        self._student_preprocess_fn = self.preprocess_fn
        self.preprocess_fn = self._dispatch

    def _dispatch(self, inputs: list[str], prompt: str | None = None, task: str | None = None, **kwargs: Any) -> dict:
        if task == TEACHER_TASK:
            if self.teacher_cache is not None:
                cached = self.teacher_cache.lookup(inputs, prompt, kwargs.get("max_length"))
                if cached is not None:
                    return cached
            return self.teacher_preprocess_fn(inputs, prompt=prompt, **kwargs)
        return self._student_preprocess_fn(inputs, prompt=prompt, task=task, **kwargs)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        self._dataset = features[0].get("dataset_name") if features else None
        return super().__call__(features)

    def _get_task_for_column(self, column_name: str, column_position: int, router_mapping: dict[str, str]) -> str | None:
        if column_position == self.teacher_column and self._dataset not in self.auxiliary:
            return TEACHER_TASK
        return super()._get_task_for_column(column_name, column_position, router_mapping)
