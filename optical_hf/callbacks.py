"""Trainer callbacks shared by both front ends (``SentenceTransformerTrainer`` and :class:`OTDistillationTrainer`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .errors import NonFiniteLossError

__all__ = ["NonFiniteLossCallback"]

_ADVICE = "lower the learning rate, or check the loss settings (e.g. the OT epsilon) and the data"


class NonFiniteLossCallback(TrainerCallback):
    """Stop training with :class:`NonFiniteLossError` at the first step whose gradients or logged loss are not finite.

    Before every optimizer step the norm of that step's gradients is checked, as they were before the Trainer clipped
    them: a NaN or infinite loss makes them non-finite, and so do finite gradients too large for the norm to be
    represented (the Trainer's clipping would then scale them to zero or NaN, and the step would silently train
    nothing). Training stops at the step it happens, before the weights or a checkpoint get it. The norms are taken by
    a post-accumulate-grad hook on each trainable parameter (one norm per parameter and micro-batch, one host read per
    optimizer step), because callbacks run after the clipping. Each logged ``loss`` and ``grad_norm`` is checked too
    (a backstop for set-ups whose gradients do not live on the parameters, such as DeepSpeed ZeRO).
    :class:`OTDistillationTrainer` installs it by default; add it to other Trainers with
    ``callbacks=[NonFiniteLossCallback()]``.
    """

    def __init__(self) -> None:
        self._norms: dict[int, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._remove_hooks()
        for param in model.parameters() if model is not None else ():
            if param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._record))

    def _record(self, param: torch.Tensor) -> None:
        if param.grad is not None:  # DDP may call the hook of a parameter whose gradient lives in its bucket only
            self._norms[id(param)] = torch.linalg.vector_norm(param.grad.detach())

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._norms = [], {}

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        norms, self._norms = list(self._norms.values()), {}
        if not norms and model is not None:  # no hook saw a gradient (e.g. DDP's bucket views): the clipped ones
            norms = [torch.linalg.vector_norm(p.grad.detach()) for p in model.parameters() if p.grad is not None]
        if not norms:
            return
        norm = float(torch.linalg.vector_norm(torch.stack([value.float().cpu() for value in norms])))
        if not math.isfinite(norm):
            self._remove_hooks()
            raise NonFiniteLossError(
                f"training step {state.global_step + 1}: the gradient norm is {norm} (the loss or the gradients are "
                f"NaN or infinite, or too large to represent); stopped before this step's optimizer update, so the "
                f"weights stay as they were: {_ADVICE}"
            )

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._remove_hooks()

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, float] | None = None, **kwargs: Any,
    ) -> None:
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise NonFiniteLossError(f"training step {state.global_step}: the logged {key} is {value}: {_ADVICE}")
