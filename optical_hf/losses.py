"""OPTICAL token-level optimal-transport distillation: the objective and its sentence-transformers loss.

The objective (Huang, Yu & Allan, WSDM 2023, Sec. 3.2): for a bitext pair (low-resource sentence ``x``, English
translation ``y``), the student embeds the tokens of ``x``, the frozen teacher embeds the tokens of ``y``, the cost
is ``C_ij = 1 - cos(s_i, t_j)``, the entropic OT plan ``P`` (Sinkhorn) is a soft token alignment, and the loss is
``<P, C>``. Alignment knowledge stays in the teacher, so training needs bitext only.

Choices the paper leaves open, made here (options of :class:`OTLossConfig`, measured in ``benchmarks/quality.py``):

* **Cost** (``cost``): ``1 - cosine`` (the paper's) or the squared Euclidean distance on the raw token states.
* **Marginals** (``marginals``): ``"content"`` (default) is uniform over *content* tokens. Padding, the tokenizer's
  special tokens (``[CLS]``, ``[SEP]``, ``<s>``, ``</s>``; not ``[UNK]``, which stands for real words of scripts the
  vocabulary lacks) and prompt tokens (e.g. e5's ``query: ``) get zero mass: they carry no translation content and
  would otherwise act as cheap "sinks" that absorb mass in both sentences. A row left with no content token falls
  back to its attention mask. ``"pooling"`` gives each side exactly the weights its pooling layer averages with
  (:func:`optical_hf.collation.pooling_weights`), so that the OT loss and the pooled sentence embeddings see the same
  tokens.
* **Debiasing** (``debias``): the Sinkhorn divergence of Feydy et al. (AISTATS 2019) instead of ``<P, C>``. With
  ``cost="sqeuclidean"`` and ``marginals="pooling"`` it tends to ``||pooled student - pooled teacher||^2`` (the
  sentence-level MSE of Reimers & Gurevych 2020, times ``dim``) as ``reg -> inf`` and to exact token-level OT as
  ``reg -> 0``: ``reg`` is then a dial between sentence-level and token-level distillation.
* **Transport** (``transport``): ``"balanced"`` (the paper's) makes every teacher token receive its mass, function
  words and all; ``"semi-relaxed"`` keeps the student side exact and relaxes the teacher side by ``rho * KL``
  (:func:`optical_hf.ot.sinkhorn` with ``rho``), which tends to each student token's softmax over the teacher tokens
  (a soft MaxSim alignment) as ``rho -> 0``.
* **Late-interaction terms**, matching MaxSim retrieval (ColBERT-style students): ``hard_alignment_weight``, each
  student token's cost to its most similar teacher token (argmax cosine, teacher side detached; the token alignment
  distillation of DR.DECR, Li et al. 2022), averaged over the student's marginal; ``maxsim_distill_weight``, in-batch
  MaxSim score distillation: ``KL(softmax(T_k / tau) || softmax(S_k / tau))`` per row, where ``T_kl`` is the teacher's
  MaxSim score of English sentence ``k`` against English sentence ``l`` of the batch and ``S_kl`` the student's score
  of the low-resource sentence ``k`` against the same (fixed) English token states. MaxSim here is the
  marginal-weighted mean over query tokens of the best cosine over the document's marginal tokens.
* **Scale of epsilon** (``reg``): relative, ``eps = reg * <a (x) b, C>`` per pair (the detached marginal-weighted mean
  cost), so one value means the same for both costs and any embedding scale.
* **Gradient**: envelope theorem by default (plan detached), see :func:`optical_hf.ot.sinkhorn`.
* **Sentence-level terms**: optional ``sentence_weight * d(student sentence, teacher sentence)`` with ``d`` the MSE
  of Reimers & Gurevych (2020) or ``1 - cosine``, and an in-batch contrastive (InfoNCE) term ``contrastive_weight``
  between the student sentence embeddings and the fixed teacher sentence embeddings of the batch's English sides.
  Each side's sentence embedding is its model's own (a SentenceTransformer's ``sentence_embedding``, normalisation
  included; a plain ``AutoModel``'s pooling in :class:`optical_hf.OTDistillationTrainer`).

Token weights, prompt lengths and the collators of both front ends are in :mod:`optical_hf.collation`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn

from .collation import TEACHER_TASK, content_mask, pooling_setup, pooling_weights, special_token_ids
from .options import OTLossConfig
from .vocabulary import CITATION
from .ot import pairwise_cost, sinkhorn, sinkhorn_divergence, uniform_weights

logger = logging.getLogger(__name__)

__all__ = ["CITATION", "OTDistillationLoss", "OTLossConfig", "distillation_losses"]

def _support(marginal: Tensor) -> tuple[Tensor, Tensor | None]:
    """A marginal argument as ``(mask, weights)``: a bool/int mask is uniform, float weights are their own support."""
    if marginal.is_floating_point():
        return marginal > 0, marginal
    return marginal.bool(), None


def _ot_term(
    student_tokens: Tensor, student_marginal: Tensor, teacher_tokens: Tensor, teacher_marginal: Tensor,
    config: OTLossConfig,
) -> Tensor:
    """``(batch,)`` token-level OT loss per pair: ``<P, C>``, or the Sinkhorn divergence with ``config.debias``."""
    (s_mask, s_weights), (t_mask, t_weights) = _support(student_marginal), _support(teacher_marginal)
    if config.debias:
        return sinkhorn_divergence(
            student_tokens, s_mask, teacher_tokens, t_mask, config.sinkhorn, cost=config.cost, x_weights=s_weights,
            y_weights=t_weights,
        ).divergence
    cost = pairwise_cost(student_tokens, teacher_tokens, config.cost)
    rho = config.rho if config.transport == "semi-relaxed" else None
    return sinkhorn(cost, s_mask, t_mask, config.sinkhorn, source_weights=s_weights, target_weights=t_weights,
                    rho=rho).cost


def _hard_alignment_term(
    student_tokens: Tensor, student_marginal: Tensor, teacher_tokens: Tensor, teacher_marginal: Tensor, cost: str,
) -> Tensor:
    """``(batch,)`` ``sum_i a_i C(s_i, t_j*(i))`` with ``j*(i) = argmax_j cos(s_i, t_j)`` over the real teacher tokens.

    ``a`` is the student marginal (renormalised), ``C`` the token cost (:func:`optical_hf.ot.pairwise_cost`) against
    the detached teacher tokens. 0 for a pair with no real token on a side.
    """
    (s_mask, s_weights), (t_mask, _) = _support(student_marginal), _support(teacher_marginal)
    with torch.autocast(device_type=student_tokens.device.type, enabled=False):
        costs = pairwise_cost(student_tokens, teacher_tokens.detach(), cost)  # (batch, n, m)
        with torch.no_grad():
            cosine_cost = costs if cost == "cosine" else pairwise_cost(student_tokens, teacher_tokens, "cosine")
            best = cosine_cost.masked_fill(~t_mask.unsqueeze(1), float("inf")).argmin(dim=2, keepdim=True)
        aligned = costs.gather(2, best).squeeze(2).masked_fill(~s_mask, 0.0)  # (batch, n)
        term = (uniform_weights(s_mask, s_weights, aligned.dtype) * aligned).sum(dim=1)
    return torch.where(t_mask.any(dim=1), term, 0.0)


def _maxsim(query: Tensor, query_marginal: Tensor, documents: Tensor, document_marginal: Tensor) -> Tensor:
    """``(batch, batch)`` MaxSim scores ``S_kl = sum_i w_ki max_j cos(q_ki, d_lj)`` of every query against every document.

    Args:
        query: ``(batch, n, dim)`` query token states; ``query_marginal`` ``(batch, n)`` their weights ``w`` (mask or
            weights, renormalised per row).
        documents: ``(batch, m, dim)`` document token states; only the tokens of ``document_marginal`` ``(batch, m)``
            compete for the max.

    Memory: a ``(batch, batch, n, m)`` similarity tensor (kept for the backward pass when ``query`` needs gradients).
    """
    (q_mask, q_weights), (d_mask, _) = _support(query_marginal), _support(document_marginal)
    with torch.autocast(device_type=query.device.type, enabled=False):
        dtype = torch.promote_types(query.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
        q = F.normalize(query.to(dtype).masked_fill(~q_mask.unsqueeze(2), 0.0), dim=-1)
        d = F.normalize(documents.to(dtype).masked_fill(~d_mask.unsqueeze(2), 0.0), dim=-1)
        # -1 is the least cosine: a padded document token never beats a real one.
        similarity = torch.einsum("kid,ljd->klij", q, d).masked_fill(~d_mask[None, :, None, :], -1.0)
        return torch.einsum("ki,kli->kl", uniform_weights(q_mask, q_weights, dtype), similarity.amax(dim=3))


def _maxsim_distillation_term(
    student_tokens: Tensor, student_marginal: Tensor, teacher_tokens: Tensor, teacher_marginal: Tensor,
    temperature: float,
) -> Tensor:
    """Batch mean of ``KL(softmax(T_k / tau) || softmax(S_k / tau))``: the teacher's MaxSim scores of English sentence
    ``k`` against the batch's English sentences (``T``, fixed) as targets for the student's scores of the low-resource
    sentence ``k`` against the same English token states (``S``)."""
    teacher_tokens = teacher_tokens.detach()
    with torch.no_grad():
        targets = _maxsim(teacher_tokens, teacher_marginal, teacher_tokens, teacher_marginal) / temperature
    scores = _maxsim(student_tokens, student_marginal, teacher_tokens, teacher_marginal) / temperature
    return F.kl_div(scores.log_softmax(dim=1), targets.log_softmax(dim=1), log_target=True, reduction="batchmean")


def _contrastive_term(student_sentence: Tensor, teacher_sentence: Tensor, temperature: float) -> Tensor:
    """InfoNCE of each pooled student embedding against the batch's fixed pooled teacher embeddings (target: own pair)."""
    student = F.normalize(student_sentence.float(), dim=-1)
    teacher = F.normalize(teacher_sentence.detach().float(), dim=-1)
    logits = student @ teacher.T / temperature
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def distillation_losses(
    student_tokens: Tensor,
    student_marginal: Tensor,
    teacher_tokens: Tensor,
    teacher_marginal: Tensor,
    config: OTLossConfig,
    student_sentence: Tensor | None = None,
    teacher_sentence: Tensor | None = None,
) -> dict[str, Tensor]:
    """The OPTICAL objective on one batch of bitext pairs.

    One rule for the marginals: ``(batch, n)`` non-negative token weights, renormalised per row; a bool (or 0/1
    integer) mask means uniform weights over its True tokens. Front ends pass
    :func:`optical_hf.collation.content_mask` for ``marginals="content"`` and
    :func:`optical_hf.collation.pooling_weights` for ``marginals="pooling"``.

    Args:
        student_tokens: ``(batch, n, dim)`` student token embeddings of the low-resource sentences.
        student_marginal: ``(batch, n)`` student-side OT weights or mask.
        teacher_tokens: ``(batch, m, dim)`` teacher token embeddings of the English translations.
        teacher_marginal: ``(batch, m)`` teacher-side OT weights or mask.
        config: the loss hyper-parameters.
        student_sentence: ``(batch, dim)`` student sentence embeddings, needed by the sentence and contrastive terms.
        teacher_sentence: ``(batch, dim)`` teacher sentence embeddings, likewise (treated as constants).

    Returns:
        The weighted terms that are enabled, among ``"ot"`` (batch mean), ``"sentence"``, ``"contrastive"``,
        ``"hard_alignment"`` (batch mean) and ``"maxsim_kd"``; the training loss is their sum.
    """
    if student_tokens.shape[-1] != teacher_tokens.shape[-1]:
        raise ValueError(
            f"student and teacher token embeddings must have the same size, got {student_tokens.shape[-1]} (student) "
            f"and {teacher_tokens.shape[-1]} (teacher)"
        )
    losses: dict[str, Tensor] = {}
    if config.ot_weight > 0:
        term = _ot_term(student_tokens, student_marginal, teacher_tokens, teacher_marginal, config)
        losses["ot"] = config.ot_weight * term.mean()
    if (config.sentence_weight > 0 or config.contrastive_weight > 0) and (
        student_sentence is None or teacher_sentence is None
    ):
        raise ValueError("sentence_weight > 0 or contrastive_weight > 0 needs student and teacher sentence embeddings")
    if config.sentence_weight > 0:
        if config.sentence_loss == "mse":
            term = F.mse_loss(student_sentence.float(), teacher_sentence.float())
        else:
            term = (1.0 - F.cosine_similarity(student_sentence.float(), teacher_sentence.float(), dim=-1)).mean()
        losses["sentence"] = config.sentence_weight * term
    if config.contrastive_weight > 0:
        term = _contrastive_term(student_sentence, teacher_sentence, config.contrastive_temperature)
        losses["contrastive"] = config.contrastive_weight * term
    if config.hard_alignment_weight > 0:
        term = _hard_alignment_term(student_tokens, student_marginal, teacher_tokens, teacher_marginal, config.cost)
        losses["hard_alignment"] = config.hard_alignment_weight * term.mean()
    if config.maxsim_distill_weight > 0:
        term = _maxsim_distillation_term(
            student_tokens, student_marginal, teacher_tokens, teacher_marginal, config.maxsim_temperature
        )
        losses["maxsim_kd"] = config.maxsim_distill_weight * term
    return losses


def _same_tokenizer(student: SentenceTransformer, teacher: SentenceTransformer) -> bool:
    s, t = getattr(student, "tokenizer", None), getattr(teacher, "tokenizer", None)
    return s is not None and t is not None and s.get_vocab() == t.get_vocab()


class OTDistillationLoss(nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        teacher: SentenceTransformer,
        config: OTLossConfig | None = None,
        **config_kwargs: Any,
    ) -> None:
        """OPTICAL optimal-transport distillation of a frozen ``teacher`` into the ``model`` (student).

        Each training row is ``(low-resource sentence, English translation)``. The student embeds the first column
        token by token, the teacher (frozen, under ``torch.no_grad()``, never seen by the optimizer) embeds the
        second. The default objective (``OTLossConfig()``) is an in-batch contrastive term between the pooled
        embeddings at weight 1 plus, at weight 0.1, the Sinkhorn divergence between the two token clouds with the
        squared Euclidean cost, each side's OT weights those of its own ``Pooling`` module (``marginals="pooling"``:
        its ``pooling_mode`` and ``include_prompt``), at relative ``reg=1``: there its plans are nearly uniform and it
        matches the clouds' pooled means and covariances (a sentence-level term); small ``reg`` makes it align tokens.
        ``cost="cosine", marginals="content", debias=False`` is the paper's ``<P, C>`` with uniform weights over
        content tokens (padding, special and prompt tokens excluded, see the module docstring for why). The plans
        are solved by Sinkhorn in fp32 (:mod:`optical_hf.ot`). A sentence-level term between the pooled embeddings
        is added with ``sentence_weight``, and late-interaction terms (semi-relaxed OT,
        hard token alignment, MaxSim score distillation) with ``transport``, ``hard_alignment_weight`` and
        ``maxsim_distill_weight``. Returns the enabled terms of :func:`distillation_losses` (``{"ot": ...,
        "sentence": ..., ...}``) so the trainer logs each component.

        The teacher may use another tokenizer than the student: then train with
        :class:`optical_hf.OTDistillationDataCollator`, which tokenizes the English column with the teacher's
        tokenizer.
        When that collator has a ``teacher_cache`` (:func:`optical_hf.teacher_cache.build_teacher_cache`), the
        English column arrives with the teacher's token states and sentence embedding already in it, and the
        teacher is not run.

        Args:
            model: the student SentenceTransformer.
            teacher: the frozen English SentenceTransformer, same embedding size as the student.
            config: the objective's hyper-parameters (default ``OTLossConfig()``), used as is.
            **config_kwargs: a shortcut for ``config=OTLossConfig(**config_kwargs)``: :class:`OTLossConfig` fields
                (``reg``, ``n_iters``, ``cost``, ``marginals``, ``debias``, ``sentence_weight``, ...). Not together
                with ``config``.

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
            from optical_hf import NonFiniteLossCallback, OTDistillationDataCollator, OTDistillationLoss, load_bitext

            teacher = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            student = SentenceTransformer("intfloat/multilingual-e5-small")
            train = load_bitext("train.sw", "train.en")  # columns "source" (Swahili), "target" (English)
            loss = OTDistillationLoss(student, teacher)  # the default recipe, OTLossConfig()
            trainer = SentenceTransformerTrainer(
                model=student, train_dataset=train, loss=loss, callbacks=[NonFiniteLossCallback()],
                data_collator=OTDistillationDataCollator(student.preprocess, teacher_preprocess_fn=teacher.preprocess),
            )
            trainer.train()
        """
        super().__init__()
        self.model = model
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if config is not None and config_kwargs:
            raise TypeError(
                f"OTDistillationLoss takes `config` or OTLossConfig keyword arguments, not both (got config and "
                f"{sorted(config_kwargs)})"
            )
        self.config = config if config is not None else OTLossConfig(**config_kwargs)
        self.shared_tokenizer = _same_tokenizer(model, teacher)
        self._special = {
            "student": special_token_ids(model.tokenizer) if self.config.exclude_special_tokens else [],
            "teacher": special_token_ids(teacher.tokenizer) if self.config.exclude_special_tokens else [],
        }
        if self.config.marginals == "pooling":
            self._pooling = {"student": pooling_setup(model, "student"), "teacher": pooling_setup(teacher, "teacher")}

    def train(self, mode: bool = True) -> OTDistillationLoss:
        """Switch the student's mode; the teacher always stays in eval mode (no dropout)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _marginal(self, features: dict[str, Any], side: str) -> Tensor:
        """``(batch, n)`` OT weights of one side: its pooling weights or its content mask (``config.marginals``)."""
        if self.config.marginals == "pooling":
            mode, include_prompt = self._pooling[side]
            return pooling_weights(features["attention_mask"], mode, features.get("prompt_length"), include_prompt)
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
        return self.compute_loss_from_outputs(source, self.model(source), target)

    def compute_loss_from_outputs(
        self, source: dict[str, Tensor], student_out: dict[str, Tensor], target: dict[str, Any],
    ) -> dict[str, Tensor]:
        """The objective's terms given the student's outputs: what :meth:`forward` runs after the student's forward.

        Args:
            source: the student's features of the low-resource column (``attention_mask``, ``input_ids``, ...).
            student_out: the student's outputs on ``source``: ``token_embeddings`` ``(batch, n, dim)`` and
                ``sentence_embedding`` ``(batch, dim)``.
            target: the English column's features, with the teacher's outputs already in them when the collator
                looked them up in a TeacherCache (else the teacher runs here, under ``no_grad``).
        """
        target = {k: v for k, v in target.items() if k != "task"}
        if "token_embeddings" in target:  # looked up in a TeacherCache by the collator
            teacher_out = {k: target[k].float() for k in ("token_embeddings", "sentence_embedding") if k in target}
        else:
            with torch.no_grad():
                teacher_out = self.teacher(target)
        return distillation_losses(
            student_out["token_embeddings"], self._marginal(source, "student"),
            teacher_out["token_embeddings"], self._marginal(target, "teacher"),
            self.config, student_out["sentence_embedding"], teacher_out.get("sentence_embedding"),
        )

    def get_config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @property
    def citation(self) -> str:
        return CITATION
