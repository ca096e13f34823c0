"""Auxiliary tasks beside the OT distillation (after Wu, Ren & Verberne 2024, arXiv 2408.11942, who add alignment
tasks to mDPR), through sentence-transformers' multi-dataset training: each task is a dataset and its loss;
:func:`optical_hf.recipe.build_trainer` puts the bitext and the tasks in one ``DatasetDict`` (each batch from one
dataset, sizes in proportion) with a dict of losses.

:class:`AuxiliaryLoss` wraps a task's loss so that its mean over each logging window is logged as ``{name}_loss``
(:class:`AuxiliaryLossCallback`): sentence-transformers averages dict-valued loss components over every step of the
window, including the steps of other datasets, which would understate a task that has only some of the batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from transformers import TrainerCallback

__all__ = ["AuxiliaryLoss", "AuxiliaryLossCallback"]


class AuxiliaryLoss(nn.Module):
    """``loss`` (any sentence-transformers loss), recording the value of every call for :class:`AuxiliaryLossCallback`."""

    def __init__(self, name: str, loss: nn.Module) -> None:
        super().__init__()
        self.name, self.loss = name, loss
        self.total, self.calls = 0.0, 0

    @property
    def model(self) -> nn.Module:  # the trainer swaps in its wrapped model through `loss.model`
        return self.loss.model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self.loss.model = model

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        value = self.loss(sentence_features, labels)
        if self.training:
            self.total += float(value.detach())
            self.calls += 1
        return value

    def get_config_dict(self) -> dict[str, Any]:
        return {"name": self.name, "loss": type(self.loss).__name__}


class AuxiliaryLossCallback(TrainerCallback):
    """Adds ``{name}_loss``, each task's mean training loss since the last log, to every training log."""

    def __init__(self, losses: Iterable[AuxiliaryLoss]) -> None:
        self.losses = list(losses)

    def install(self, trainer: Any) -> None:
        """Put this callback first in ``trainer``'s callback list, so the progress bar and reporters see the values."""
        trainer.callback_handler.callbacks.insert(0, self)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:
            return
        for loss in self.losses:
            if loss.calls:
                logs[f"{loss.name}_loss"] = round(loss.total / loss.calls, 6)
                if state.log_history and state.log_history[-1].get("step") == state.global_step:
                    state.log_history[-1][f"{loss.name}_loss"] = logs[f"{loss.name}_loss"]
            loss.total, loss.calls = 0.0, 0
