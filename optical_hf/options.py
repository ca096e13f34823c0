"""The options of the objective, declared and validated once: :class:`SinkhornOptions` (the solver) and
:class:`OTLossConfig` (the loss, which holds the solver's options of its OT term).

This module imports neither torch nor transformers, so that parsing a command line or a config costs no model
library. :mod:`optical_hf.ot` takes a :class:`SinkhornOptions` whole; :class:`optical_hf.OTDistillationLoss`,
:class:`optical_hf.OTDistillationConfig` and the ``optical-hf distill`` flags take the :class:`OTLossConfig` fields.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

from .errors import OpticalInputError

logger = logging.getLogger(__name__)

__all__ = ["OTLossConfig", "SinkhornOptions"]


def _check_number(owner: str, name: str, value: Any, positive: bool) -> None:
    """Raise unless ``value`` is a finite real number, ``> 0`` (``positive``) or ``>= 0``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise OpticalInputError(f"{owner}.{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def _check_count(owner: str, name: str, value: Any) -> None:
    """Raise unless ``value`` is an integer ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OpticalInputError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


def _check_choices(options: Any, declared_by: type) -> None:
    """Raise unless each ``Literal`` field that the dataclass ``declared_by`` declares holds one of its choices in
    ``options`` (an instance of it or of a subclass) and each ``bool`` field a bool."""
    for name, hint in get_type_hints(declared_by).items():
        value = getattr(options, name)
        if getattr(hint, "__origin__", None) is Literal and value not in get_args(hint):
            raise OpticalInputError(f"{declared_by.__name__}.{name} must be one of {get_args(hint)}, got {value!r}")
        if hint is bool and not isinstance(value, bool):
            raise OpticalInputError(f"{declared_by.__name__}.{name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class SinkhornOptions:
    """How :func:`optical_hf.sinkhorn` and :func:`optical_hf.sinkhorn_divergence` solve: one frozen object, checked
    when it is made and passed whole (the defaults are the shipped objective's).

    Attributes:
        reg: entropic regularisation ``epsilon``, finite and > 0: a multiple of each pair's detached independent
            cost ``<a (x) b, C>`` (``relative=True``) or in the units of the cost (``relative=False``).
        relative: whether ``reg`` is relative to the cost scale (one value means the same for any cost and
            embedding scale) or absolute.
        n_iters: Sinkhorn iterations, >= 1 (the most when ``tol`` is set).
        tol: stop once every pair's L1 row-marginal error is below ``tol`` (one host read per check); ``None`` runs
            ``n_iters`` iterations.
        check_every: iterations between two convergence checks (used only with ``tol``).
        grad: ``"envelope"`` (the plan is detached: gradient ``P*`` w.r.t. the cost, no memory for the iterations)
            or ``"autodiff"`` (back-propagates through every iteration).
        domain: where the iterations run: ``"auto"`` (the scaling domain when the kernel's span is safe in the work
            dtype, the log domain otherwise), ``"log"`` (always; stable for any ``epsilon``) or ``"scaling"``
            (always; cheaper per iteration, but the kernel may under- or overflow at a small ``epsilon``).
    """

    reg: float = 1.0
    relative: bool = True
    n_iters: int = 100
    tol: float | None = 1e-4
    check_every: int = 10
    grad: Literal["envelope", "autodiff"] = "envelope"
    domain: Literal["auto", "log", "scaling"] = "auto"

    def __post_init__(self) -> None:
        _check_choices(self, SinkhornOptions)
        _check_number("SinkhornOptions", "reg", self.reg, positive=True)
        _check_count("SinkhornOptions", "n_iters", self.n_iters)
        _check_count("SinkhornOptions", "check_every", self.check_every)
        if self.tol is not None:
            _check_number("SinkhornOptions", "tol", self.tol, positive=False)


@dataclass
class OTLossConfig:
    """Hyper-parameters of the OPTICAL objective: their one declaration, for both front ends and the command line.

    ``HfArgumentParser`` reads it directly (``optical-hf distill --reg 0.1 --cost sqeuclidean ...``; ``--ot_reg``,
    ``--ot_iters`` and ``--ot_grad`` are aliases kept from earlier versions), and
    :class:`optical_hf.OTDistillationConfig` inherits its fields. :mod:`optical_hf.losses` says what each choice means;
    ``__post_init__`` rejects out-of-range values with an :class:`optical_hf.OpticalInputError` (a ``ValueError``)
    naming the option.

    The defaults: the in-batch contrastive term at weight 1 plus a debiased squared-Euclidean OT term with pooling
    marginals (the Sinkhorn divergence) at ``reg`` 1.0, weight 0.1. At that ``reg`` the plans are nearly uniform, so
    the OT term acts as its large-``reg`` limit: ``dim`` times the squared gap of the pooled token states plus a
    covariance-matching part, a sentence-level term on raw token states, not a token alignment (measured, with the
    controls that separate the two: ``benchmarks/README.md``). ``OTLossConfig(cost="cosine", marginals="content",
    debias=False, reg=0.1, ot_weight=1.0, contrastive_weight=0.0)`` is the plain OPTICAL objective of the paper.
    """

    reg: float = field(default=1.0, metadata={"aliases": ["--ot_reg"], "help":
        "Entropic regularisation epsilon, relative to the cost scale: eps = reg * (marginal-weighted mean cost) "
        "per pair. Smaller: sharper token alignment, more Sinkhorn iterations needed."})
    n_iters: int = field(default=100, metadata={"aliases": ["--ot_iters"], "help":
        "Sinkhorn iterations at most (exactly this many with --tol 0)."})
    tol: float | None = field(default=1e-4, metadata={
        "help": "Stop Sinkhorn once the L1 marginal error is below tol, checked every 10 iterations (one host sync "
                "each); 0 or None runs all n_iters. At the default reg 1.0 the plans meet 1e-4 after 10 iterations."})
    grad: Literal["envelope", "autodiff"] = field(default="envelope", metadata={"aliases": ["--ot_grad"],
        "help": "Gradient through OT: 'envelope' (plan detached, no memory for the iterations) or 'autodiff'."})
    cost: Literal["cosine", "sqeuclidean"] = field(default="sqeuclidean", metadata={
        "help": "Token cost: 'cosine' (1 - cos, the paper's) or 'sqeuclidean' (squared distance of raw token states)."})
    marginals: Literal["content", "pooling"] = field(default="pooling", metadata={
        "help": "OT token weights: 'content' (uniform over content tokens) or 'pooling' (the weights each side's "
                "pooling averages with)."})
    debias: bool = field(default=True, metadata={
        "help": "Use the Sinkhorn divergence (Feydy et al. 2019) instead of <P, C>; with sqeuclidean cost and pooling "
                "marginals it tends to the pooled-embedding MSE as reg grows."})
    transport: Literal["balanced", "semi-relaxed"] = field(default="balanced", metadata={
        "help": "Token OT: 'balanced' (every teacher token receives its mass) or 'semi-relaxed' (student side exact, "
                "teacher side relaxed by rho * KL: each student token may go to the teacher tokens it matches)."})
    rho: float = field(default=1.0, metadata={
        "help": "'semi-relaxed' transport: KL penalty of the teacher-side marginal, relative to the cost scale like "
                "reg. rho -> 0: each student token a softmax over the teacher tokens (soft MaxSim); rho -> inf: "
                "balanced OT."})
    exclude_special_tokens: bool = field(default=True, metadata={
        "help": "'content' marginals: give special tokens ([CLS], </s>, ...; not [UNK]) zero mass."})
    exclude_prompt: bool = field(default=True, metadata={
        "help": "'content' marginals: give prompt tokens (e.g. 'query: ') zero mass."})
    ot_weight: float = field(default=0.1, metadata={"help": "Weight of the OT term between the token clouds (at large "
                                                            "reg it matches their pooled means; at small reg it aligns "
                                                            "tokens)."})
    sentence_weight: float = field(default=0.0, metadata={
        "help": "Weight of the sentence-level term between sentence embeddings (0 disables it)."})
    sentence_loss: Literal["mse", "cosine"] = field(default="mse", metadata={
        "help": "Sentence-level distance: 'mse' or 'cosine' (1 - cos)."})
    contrastive_weight: float = field(default=1.0, metadata={
        "help": "Weight of the in-batch contrastive (InfoNCE) term: pooled student vs the batch's pooled teacher "
                "embeddings (0 disables it)."})
    contrastive_temperature: float = field(default=0.05, metadata={
        "help": "Temperature dividing the cosine similarities of the contrastive term."})
    hard_alignment_weight: float = field(default=0.0, metadata={
        "help": "Weight of the hard token-alignment term (DR.DECR): each student token's cost (--cost) to its most "
                "similar teacher token by cosine, averaged over the student's marginal (0 disables it)."})
    maxsim_distill_weight: float = field(default=0.0, metadata={
        "help": "Weight of the in-batch MaxSim score distillation term: KL between the softmax of the teacher's "
                "MaxSim scores of each English sentence against the batch's English sentences and the student's for "
                "the low-resource sentence (0 disables it)."})
    maxsim_temperature: float = field(default=0.05, metadata={
        "help": "Temperature dividing the MaxSim scores (mean best cosines) of the MaxSim distillation term."})

    def __post_init__(self) -> None:
        _check_choices(self, OTLossConfig)
        _check_number("OTLossConfig", "contrastive_temperature", self.contrastive_temperature, positive=True)
        _check_number("OTLossConfig", "maxsim_temperature", self.maxsim_temperature, positive=True)
        _check_number("OTLossConfig", "rho", self.rho, positive=True)
        if self.debias and self.transport != "balanced":
            raise OpticalInputError("OTLossConfig.debias supports transport='balanced' only, got 'semi-relaxed'")
        try:  # reg, n_iters, tol, grad: checked where they are declared for the solver, named as this class's
            self.sinkhorn  # noqa: B018
        except OpticalInputError as error:
            raise OpticalInputError(str(error).replace("SinkhornOptions.", "OTLossConfig.", 1)) from None
        weights = {"ot_weight": self.ot_weight, "sentence_weight": self.sentence_weight,
                   "contrastive_weight": self.contrastive_weight, "hard_alignment_weight": self.hard_alignment_weight,
                   "maxsim_distill_weight": self.maxsim_distill_weight}
        for name, value in weights.items():
            _check_number("OTLossConfig", name, value, positive=False)
        if not any(weights.values()):
            raise OpticalInputError(f"OTLossConfig: at least one loss weight must be > 0, got {weights}")
        defaults = OTLossConfig.__dataclass_fields__
        idle = {"rho": self.transport != "semi-relaxed" and self.rho != defaults["rho"].default,
                "exclude_special_tokens": self.marginals == "pooling" and not self.exclude_special_tokens,
                "exclude_prompt": self.marginals == "pooling" and not self.exclude_prompt}
        for name in (name for name, unused in idle.items() if unused):
            logger.warning("OTLossConfig.%s=%r has no effect with transport=%r and marginals=%r", name,
                           getattr(self, name), self.transport, self.marginals)

    def to_dict(self) -> dict[str, Any]:
        """The values of the fields declared here (also on a subclass such as :class:`optical_hf.OTDistillationConfig`,
        whose other fields are left out): what a model card and a loss's ``get_config_dict`` record."""
        return {f.name: getattr(self, f.name) for f in fields(OTLossConfig)}

    @property
    def sinkhorn(self) -> SinkhornOptions:
        """The solver options of the OT term: ``reg`` relative to each pair's cost scale, ``n_iters``, ``tol`` (``0``
        means none) and ``grad``, checked every 10 iterations in the domain the kernel's span allows."""
        return SinkhornOptions(reg=self.reg, relative=True, n_iters=self.n_iters, tol=self.tol or None,
                               grad=self.grad)
