"""Hybrid batches (Elmahdy, Lin & Ahmad 2024, arXiv 2408.10536): train on monolingual samples with probability α and
on cross-lingual ones with 1 − α, α fixed or on a schedule.

In a bitext-only setting the cross-lingual sample is the usual pair (low-resource sentence → the teacher's English
translation) and the monolingual one is English self-distillation: the student encodes the English side, with its
query prompt, against the teacher's embedding of the same sentence (:func:`with_monolingual` appends those rows).
:class:`HybridBatchSampler` draws, for each batch (``granularity="batch"``, the paper's) or for each entry
(``"entry"``, as Multilingual Translate-Distill mixes), the monolingual kind with probability α, deterministically by
seed and epoch; an epoch has as many batches as the cross-lingual pairs alone, so a hybrid run takes the same
optimizer steps as the plain one. :class:`HybridAlphaCallback` sets α from its :class:`AlphaSchedule` at every step
and logs it as ``hybrid_alpha``.

The sampler reads α when the data loader asks for the next batch, which may be one batch ahead of the step being
trained: a schedule is followed up to that one-step lag.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler
from transformers import TrainerCallback

from .arguments import HybridBatchArguments

__all__ = ["AlphaSchedule", "HybridAlphaCallback", "HybridBatchSampler", "HybridBatches", "HybridState",
           "hybrid_batches", "with_monolingual"]


@dataclass(frozen=True)
class AlphaSchedule:
    """α, the probability of a monolingual sample, as a function of the training progress.

    ``kind``: ``"constant"`` (``start`` throughout), ``"linear"`` (``start`` → ``end``), ``"cosine"`` (``start`` →
    ``end`` along a half cosine), ``"step"`` (``start`` before the ``step_at`` fraction of training, ``end`` after), or
    any callable ``(step, max_steps) -> α``.
    """

    start: float = 0.5
    end: float | None = None
    kind: str | Callable[[int, int], float] = "constant"
    step_at: float = 0.5

    def __post_init__(self) -> None:
        HybridBatchArguments(hybrid_alpha=self.start, hybrid_alpha_end=self.end, hybrid_step_at=self.step_at,
                             **({} if callable(self.kind) else {"hybrid_schedule": self.kind}))  # checks the values

    @classmethod
    def from_arguments(cls, args: HybridBatchArguments) -> AlphaSchedule:
        """The schedule of the ``--hybrid_*`` flags (``hybrid_alpha`` must be set)."""
        return cls(args.hybrid_alpha, args.hybrid_alpha_end, args.hybrid_schedule, args.hybrid_step_at)

    def __call__(self, step: int, max_steps: int) -> float:
        """α at optimizer step ``step`` of ``max_steps``."""
        if callable(self.kind):
            return float(self.kind(step, max_steps))
        end = self.start if self.end is None else self.end
        progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
        if self.kind == "linear":
            return self.start + (end - self.start) * progress
        if self.kind == "cosine":
            return end + (self.start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":
            return self.start if progress < self.step_at else end
        return self.start


@dataclass
class HybridState:
    """The current α, written by :class:`HybridAlphaCallback` and read by :class:`HybridBatchSampler`."""

    alpha: float


class HybridBatchSampler(DefaultBatchSampler):
    """Batches of ``dataset`` (the cross-lingual rows first, ``n_cross`` of them, then the monolingual ones, as
    :func:`with_monolingual` lays them out), each batch or entry monolingual with probability ``state.alpha``.

    Indices of each kind come from a permutation of that kind drawn per epoch (``seed + epoch``) and cycled if a kind
    runs out. ``len`` is the number of batches of the ``n_cross`` cross-lingual rows alone. Pass it to
    sentence-transformers' trainer as ``batch_sampler=functools.partial(HybridBatchSampler, n_cross=..., state=...)``
    (the trainer calls it with the dataset, batch size, ``drop_last``, generator and seed).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        *,
        n_cross: int,
        state: HybridState,
        granularity: str = "batch",
    ) -> None:
        super().__init__(dataset, batch_size, drop_last, valid_label_columns, generator, seed)
        if not 0 < n_cross < len(dataset):
            raise ValueError(f"HybridBatchSampler: n_cross={n_cross} must split the {len(dataset)} rows into "
                             "cross-lingual (first) and monolingual (after) rows")
        self.n_cross, self.n_mono, self.state, self.granularity = n_cross, len(dataset) - n_cross, state, granularity

    def __len__(self) -> int:
        return self.n_cross // self.batch_size if self.drop_last else math.ceil(self.n_cross / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = torch.Generator().manual_seed(self.seed + self.epoch)
        pools = {False: torch.randperm(self.n_cross, generator=rng).tolist(),
                 True: (self.n_cross + torch.randperm(self.n_mono, generator=rng)).tolist()}
        cursor = {False: 0, True: 0}

        def take(mono: bool) -> int:
            pool = pools[mono]
            index = pool[cursor[mono] % len(pool)]
            cursor[mono] += 1
            return index

        for number in range(len(self)):
            size = min(self.batch_size, self.n_cross - number * self.batch_size)
            if self.granularity == "batch":
                mono = torch.rand(1, generator=rng).item() < self.state.alpha
                yield [take(mono) for _ in range(size)]
            else:
                yield [take(draw < self.state.alpha) for draw in torch.rand(size, generator=rng).tolist()]


class HybridAlphaCallback(TrainerCallback):
    """Sets ``state.alpha`` from ``schedule`` at the start of every optimizer step and logs it as ``hybrid_alpha``.

    Install it with :meth:`install`: first among the trainer's callbacks, so that the progress bar and the reporting
    integrations, which read the logs in their own ``on_log``, see ``hybrid_alpha`` too.
    """

    def install(self, trainer: Any) -> None:
        """Put this callback first in ``trainer``'s callback list."""
        trainer.callback_handler.callbacks.insert(0, self)

    def __init__(self, schedule: AlphaSchedule, state: HybridState) -> None:
        self.schedule, self.state = schedule, state

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.state.alpha = self.schedule(state.global_step, state.max_steps)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.state.alpha = self.schedule(state.global_step, state.max_steps)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            logs["hybrid_alpha"] = round(self.state.alpha, 6)
            # Trainer.log appends its copy of the logs to the history just before the callbacks run
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["hybrid_alpha"] = logs["hybrid_alpha"]


@dataclass
class HybridBatches:
    """What a trainer needs for hybrid batches: the training rows, the batch sampler factory and the callback."""

    dataset: datasets.Dataset
    batch_sampler: Callable[..., HybridBatchSampler]
    callback: HybridAlphaCallback


def with_monolingual(bitext: datasets.Dataset, source: str = "source", target: str = "target") -> datasets.Dataset:
    """``bitext`` (its ``source``/``target`` columns) followed by one monolingual row per pair: the English ``target``
    in both columns."""
    cross = bitext.select_columns([source, target])
    mono = datasets.Dataset.from_dict({source: list(cross[target]), target: list(cross[target])},
                                      features=cross.features)
    return datasets.concatenate_datasets([cross, mono])


def hybrid_batches(bitext: datasets.Dataset, args: HybridBatchArguments, source: str = "source",
                   target: str = "target") -> HybridBatches:
    """The rows, sampler factory and callback of a hybrid run over ``bitext`` with the ``--hybrid_*`` options."""
    schedule = AlphaSchedule.from_arguments(args)
    state = HybridState(schedule(0, 1))
    sampler = functools.partial(HybridBatchSampler, n_cross=len(bitext), state=state,
                                granularity=args.hybrid_granularity)
    return HybridBatches(with_monolingual(bitext, source, target), sampler, HybridAlphaCallback(schedule, state))
