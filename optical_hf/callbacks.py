"""Trainer callbacks shared by both front ends (``SentenceTransformerTrainer`` and :class:`OTDistillationTrainer`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .errors import NonFiniteLossError

__all__ = ["NonFiniteLossCallback", "gradient_norm"]

_ADVICE = "lower the learning rate, or check the loss settings (e.g. the OT epsilon) and the data"


def gradient_norm(model: nn.Module) -> float | None:
    """L2 norm of all the gradients held by ``model``'s parameters (``None`` when none holds one)."""
    grads = [param.grad for param in model.parameters() if param.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


class NonFiniteLossCallback(TrainerCallback):
    """Stop training with :class:`NonFiniteLossError` at the first step whose gradients or logged loss are not finite.

    Before every optimizer step (after the Trainer's gradient clipping) the norm of the gradients is checked: a NaN or
    infinite loss makes them non-finite, so training stops at the step it happens, before NaN reaches the weights or
    a checkpoint. Each logged ``loss`` and ``grad_norm`` is checked too (a backstop for set-ups whose gradients do not
    live on the parameters, such as DeepSpeed ZeRO). :class:`OTDistillationTrainer` installs it by default; add it to
    other Trainers with ``callbacks=[NonFiniteLossCallback()]``.
    """

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        norm = gradient_norm(model) if model is not None else None
        if norm is not None and not math.isfinite(norm):
            raise NonFiniteLossError(
                f"training step {state.global_step + 1}: the gradient norm is {norm} (the loss or the gradients are "
                f"NaN or infinite); stopped before this step's optimizer update, so the weights stay finite: {_ADVICE}"
            )

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, float] | None = None, **kwargs: Any,
    ) -> None:
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise NonFiniteLossError(f"training step {state.global_step}: the logged {key} is {value}: {_ADVICE}")
