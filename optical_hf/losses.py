"""OPTICAL token-level optimal-transport distillation: the objective and its sentence-transformers loss.

The objective (Huang, Yu & Allan, WSDM 2023, Sec. 3.2): for a bitext pair (low-resource sentence ``x``, English
translation ``y``), the student embeds the tokens of ``x``, the frozen teacher embeds the tokens of ``y``, the cost
is ``C_ij = 1 - cos(s_i, t_j)``, the entropic OT plan ``P`` (Sinkhorn) is a soft token alignment, and the loss is
``<P, C>``. Alignment knowledge stays in the teacher, so training needs bitext only.

Choices the paper leaves open, made here (and measured in ``benchmarks/quality.py``):

* **Marginals**: uniform over *content* tokens. Padding, the tokenizer's special tokens (``[CLS]``, ``[SEP]``,
  ``<s>``, ``</s>``) and prompt tokens (e.g. e5's ``query: ``) get zero mass: they carry no translation content and
  would otherwise act as cheap "sinks" that absorb mass in both sentences (``[CLS]``/``<s>`` are near-identical
  across sentences) and dilute the alignment signal. A row left with no content token (an empty sentence) falls back
  to its attention mask.
* **Gradient**: envelope theorem by default (plan detached), see :func:`optical_hf.ot.sinkhorn`.
* **Sentence-level term**: optional ``sentence_weight * d(pooled student, pooled teacher)`` with ``d`` the MSE of
  Reimers & Gurevych (2020) or ``1 - cosine``, so token-level and sentence-level distillation can be combined.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
from torch import Tensor, nn

from .ot import sinkhorn
from .teacher_cache import TeacherCache

__all__ = [
    "CITATION",
    "OTDistillationDataCollator",
    "OTDistillationLoss",
    "OTLossConfig",
    "content_mask",
    "distillation_losses",
]

CITATION = """@inproceedings{huang2023optical,
  title={Improving Cross-lingual Information Retrieval on Low-Resource Languages via Optimal Transport Distillation},
  author={Huang, Zhiqi and Yu, Puxuan and Allan, James},
  booktitle={Proceedings of the Sixteenth ACM International Conference on Web Search and Data Mining (WSDM '23)},
  year={2023},
  doi={10.1145/3539597.3570468}
}"""

TEACHER_TASK = "optical_teacher"
"""Task name that :class:`OTDistillationDataCollator` stamps on the column it tokenizes with the teacher."""


@dataclass
class OTLossConfig:
    """Hyper-parameters of the OPTICAL objective, shared by both front ends.

    Args:
        reg: entropic regularisation ``epsilon`` of Sinkhorn, in cosine-distance units.
        n_iters: Sinkhorn iterations.
        tol: optional marginal tolerance for early stopping (one host sync per 10 iterations).
        grad: ``"envelope"`` (plan detached) or ``"autodiff"`` (differentiate through Sinkhorn).
        backend: ``"torch"`` or ``"pot"`` (POT's ``ot.solve_batch``).
        exclude_special_tokens: give zero marginal mass to special tokens (``[CLS]``, ``</s>``, ...).
        exclude_prompt: give zero marginal mass to prompt tokens (e.g. ``query: ``).
        ot_weight: weight of the token-level OT term.
        sentence_weight: weight of the sentence-level term (0 disables it).
        sentence_loss: ``"mse"`` or ``"cosine"`` distance between pooled embeddings.
    """

    reg: float = 0.05
    n_iters: int = 50
    tol: float | None = None
    grad: Literal["envelope", "autodiff"] = "envelope"
    backend: Literal["torch", "pot"] = "torch"
    exclude_special_tokens: bool = True
    exclude_prompt: bool = True
    ot_weight: float = 1.0
    sentence_weight: float = 0.0
    sentence_loss: Literal["mse", "cosine"] = "mse"

    def __post_init__(self) -> None:
        if self.reg <= 0:
            raise ValueError(f"OT `reg` (epsilon) must be > 0, got {self.reg}")
        if self.n_iters < 1:
            raise ValueError(f"OT `n_iters` must be >= 1, got {self.n_iters}")
        if self.sentence_loss not in ("mse", "cosine"):
            raise ValueError(f"`sentence_loss` must be 'mse' or 'cosine', got {self.sentence_loss!r}")
        if self.ot_weight < 0 or self.sentence_weight < 0 or self.ot_weight + self.sentence_weight == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got ot_weight={self.ot_weight}, "
                f"sentence_weight={self.sentence_weight}"
            )


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
        special_ids: ids to exclude (``tokenizer.all_special_ids``); empty to keep them.
        prompt_length: number of leading positions taken by the prompt (including a leading special token), as
            sentence-transformers reports it in ``features["prompt_length"]``; ``None`` or 0 for no prompt.

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


def distillation_losses(
    student_tokens: Tensor,
    student_mask: Tensor,
    teacher_tokens: Tensor,
    teacher_mask: Tensor,
    config: OTLossConfig,
    student_sentence: Tensor | None = None,
    teacher_sentence: Tensor | None = None,
) -> dict[str, Tensor]:
    """The OPTICAL objective on one batch of bitext pairs.

    Args:
        student_tokens: ``(batch, n, dim)`` student token embeddings of the low-resource sentences.
        student_mask: ``(batch, n)`` bool marginal support on the student side (see :func:`content_mask`).
        teacher_tokens: ``(batch, m, dim)`` teacher token embeddings of the English translations.
        teacher_mask: ``(batch, m)`` bool marginal support on the teacher side.
        config: the loss hyper-parameters.
        student_sentence: ``(batch, dim)`` pooled student embeddings, needed when ``config.sentence_weight > 0``.
        teacher_sentence: ``(batch, dim)`` pooled teacher embeddings, likewise.

    Returns:
        ``{"ot": weighted mean <P, C>}`` plus ``{"sentence": weighted sentence term}`` when enabled; the training
        loss is their sum.
    """
    if student_tokens.shape[-1] != teacher_tokens.shape[-1]:
        raise ValueError(
            f"student and teacher token embeddings must have the same size for a cosine cost, got "
            f"{student_tokens.shape[-1]} (student) and {teacher_tokens.shape[-1]} (teacher)"
        )
    losses: dict[str, Tensor] = {}
    if config.ot_weight > 0:
        with torch.autocast(device_type=student_tokens.device.type, enabled=False):
            s = F.normalize(student_tokens.float(), dim=-1)
            t = F.normalize(teacher_tokens.float(), dim=-1)
            cost = 1.0 - torch.bmm(s, t.transpose(1, 2))
            result = sinkhorn(
                cost, student_mask, teacher_mask, reg=config.reg, n_iters=config.n_iters, tol=config.tol,
                grad=config.grad, backend=config.backend,
            )
        losses["ot"] = config.ot_weight * result.cost.mean()
    if config.sentence_weight > 0:
        if student_sentence is None or teacher_sentence is None:
            raise ValueError("sentence_weight > 0 needs pooled student and teacher embeddings")
        if config.sentence_loss == "mse":
            term = F.mse_loss(student_sentence.float(), teacher_sentence.float())
        else:
            term = (1.0 - F.cosine_similarity(student_sentence.float(), teacher_sentence.float(), dim=-1)).mean()
        losses["sentence"] = config.sentence_weight * term
    return losses


def _same_tokenizer(student: SentenceTransformer, teacher: SentenceTransformer) -> bool:
    s, t = getattr(student, "tokenizer", None), getattr(teacher, "tokenizer", None)
    return s is not None and t is not None and s.get_vocab() == t.get_vocab()


class OTDistillationLoss(nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        teacher: SentenceTransformer,
        reg: float = 0.05,
        n_iters: int = 50,
        sentence_weight: float = 0.0,
        sentence_loss: Literal["mse", "cosine"] = "mse",
        **config_kwargs: Any,
    ) -> None:
        """OPTICAL optimal-transport distillation of a frozen ``teacher`` into the ``model`` (student).

        Each training row is ``(low-resource sentence, English translation)``. The student embeds the first column
        token by token, the teacher (frozen, under ``torch.no_grad()``, never seen by the optimizer) embeds the
        second; the cost between tokens is ``1 - cosine``, the marginals are uniform over content tokens
        (padding, special and prompt tokens excluded, see the module docstring for why), the plan is entropic OT
        solved by log-domain Sinkhorn in fp32, and the loss is the batch mean of ``<P, C>``. An optional
        sentence-level term (MSE or ``1 - cosine`` between pooled embeddings) is added with ``sentence_weight``.
        Returns ``{"ot": ..., "sentence": ...}`` so the trainer logs each component.

        The teacher may use another tokenizer than the student: then train with
        :class:`OTDistillationDataCollator`, which tokenizes the English column with the teacher's tokenizer.
        When that collator has a ``teacher_cache`` (:func:`optical_hf.teacher_cache.build_teacher_cache`), the
        English column arrives with the teacher's token states and sentence embedding already in it, and the
        teacher is not run.

        Args:
            model: the student SentenceTransformer.
            teacher: the frozen English SentenceTransformer, same embedding size as the student.
            reg: Sinkhorn entropic regularisation ``epsilon``.
            n_iters: Sinkhorn iterations.
            sentence_weight: weight of the sentence-level term (0: token-level OT only).
            sentence_loss: ``"mse"`` or ``"cosine"``.
            **config_kwargs: other :class:`OTLossConfig` fields (``tol``, ``grad``, ``backend``,
                ``exclude_special_tokens``, ``exclude_prompt``, ``ot_weight``).

        References:
            - Huang, Yu & Allan, Improving Cross-lingual Information Retrieval on Low-Resource Languages via
              Optimal Transport Distillation, WSDM 2023: https://arxiv.org/abs/2301.12566
            - Reimers & Gurevych, Making Monolingual Sentence Embeddings Multilingual using Knowledge
              Distillation, EMNLP 2020 (the sentence-level MSE term): https://arxiv.org/abs/2004.09813

        Inputs:
            +-------------------------------------------------+--------+
            | Texts                                           | Labels |
            +=================================================+========+
            | (low-resource sentence, English translation)    | none   |
            +-------------------------------------------------+--------+

        Example::

            from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
            from optical_hf import OTDistillationDataCollator, OTDistillationLoss, load_bitext

            teacher = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            student = SentenceTransformer("intfloat/multilingual-e5-small")
            train = load_bitext("train.sw", "train.en")  # columns "source" (Swahili), "target" (English)
            loss = OTDistillationLoss(student, teacher, reg=0.05)
            trainer = SentenceTransformerTrainer(
                model=student, train_dataset=train, loss=loss,
                data_collator=OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess),
            )
            trainer.train()
        """
        super().__init__()
        self.model = model
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.config = OTLossConfig(reg=reg, n_iters=n_iters, sentence_weight=sentence_weight,
                                   sentence_loss=sentence_loss, **config_kwargs)
        self.shared_tokenizer = _same_tokenizer(model, teacher)
        self._special = {
            "student": model.tokenizer.all_special_ids if self.config.exclude_special_tokens else [],
            "teacher": teacher.tokenizer.all_special_ids if self.config.exclude_special_tokens else [],
        }

    def train(self, mode: bool = True) -> OTDistillationLoss:
        """Switch the student's mode; the teacher always stays in eval mode (no dropout)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _mask(self, features: dict[str, Any], side: str) -> Tensor:
        prompt_length = features.get("prompt_length") if self.config.exclude_prompt else None
        return content_mask(features["input_ids"], features["attention_mask"], self._special[side], prompt_length)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> dict[str, Tensor]:
        source, target = list(sentence_features)[:2]
        if target.get("task") != TEACHER_TASK and not self.shared_tokenizer:
            raise ValueError(
                "OTDistillationLoss: the student and the teacher use different tokenizers, but the English column "
                "was tokenized by the student. Pass `data_collator=OTDistillationDataCollator(student.preprocess, "
                "teacher.preprocess)` to the trainer."
            )
        target = {k: v for k, v in target.items() if k != "task"}
        student_out = self.model(source)
        if "token_embeddings" in target:  # looked up in a TeacherCache by the collator
            teacher_out = {k: target[k].float() for k in ("token_embeddings", "sentence_embedding") if k in target}
        else:
            with torch.no_grad():
                teacher_out = self.teacher(target)
        return distillation_losses(
            student_out["token_embeddings"], self._mask(source, "student"),
            teacher_out["token_embeddings"], self._mask(target, "teacher"),
            self.config, student_out["sentence_embedding"], teacher_out.get("sentence_embedding"),
        )

    def get_config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    @property
    def citation(self) -> str:
        return CITATION


@dataclass
class OTDistillationDataCollator(SentenceTransformerDataCollator):
    """sentence-transformers collator that tokenizes the English column with the teacher's own tokenizer.

    The column at ``teacher_column`` (position among the text columns, default 1: the English side) goes through
    ``teacher_preprocess_fn``; every other column through ``preprocess_fn`` (the student's). The teacher column is
    stamped with the task :data:`TEACHER_TASK` so :class:`OTDistillationLoss` can check it. ``prompts`` work per
    column as in sentence-transformers.

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
    _student_preprocess_fn: Callable | None = field(default=None, init=False, repr=False)

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

    def _get_task_for_column(self, column_name: str, column_position: int, router_mapping: dict[str, str]) -> str | None:
        if column_position == self.teacher_column:
            return TEACHER_TASK
        return super()._get_task_for_column(column_name, column_position, router_mapping)
