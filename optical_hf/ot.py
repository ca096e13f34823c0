"""Batched, masked entropic optimal transport (Sinkhorn, scaling or log domain) and the Sinkhorn divergence.

For each pair ``b`` of a batch, :func:`sinkhorn` solves

.. math::

    P_b = \\arg\\min_{P \\ge 0,\\ P 1 = a_b,\\ P^T 1 = w_b} \\langle P, C_b \\rangle_F
          + \\varepsilon_b \\mathrm{KL}(P \\,|\\, a_b \\otimes w_b),
    \\qquad \\mathrm{OT}_{\\varepsilon_b} = \\langle P_b, C_b \\rangle_F + \\varepsilon_b \\mathrm{KL}(P_b \\,|\\, a_b \\otimes w_b)

where ``a_b`` and ``w_b`` are probability weights over the *real* (unmasked) tokens of the two sides (the plan is the
same as with the entropy ``-H(P)``: the two objectives differ by a constant). OPTICAL (Huang, Yu & Allan, WSDM 2023,
Sec. 3) uses the plan ``P`` as a soft token alignment between the student's tokens of a low-resource sentence and the
teacher's tokens of its English translation and trains the student on ``<P, C>``.

:func:`sinkhorn_divergence` is the debiased loss of Feydy et al. (AISTATS 2019, arXiv 1810.08278),
``S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2``: non-negative, 0 for identical inputs, exact OT
as ``eps -> 0`` and, with the squared Euclidean cost, ``||mean_a - mean_b||^2`` (the sentence-level MSE of pooled
embeddings, up to the factor ``dim``) as ``eps -> inf``.

With ``rho`` (:func:`sinkhorn`), the target marginal is relaxed by a KL penalty (semi-relaxed OT, Chizat et al. 2018;
Séjourné et al. 2019): each source token keeps its mass exactly but may send it to the target tokens it is close to,
instead of having to cover every target token (function words, special tokens). The problem, the update it needs and
its two limits are stated in :func:`sinkhorn`.

``reg`` may be absolute (in cost units) or relative (:class:`optical_hf.SinkhornOptions` ``relative=True``, the
default): then each pair's
``eps_b = reg * <a_b (x) w_b, C_b>``, the detached cost of the independent coupling (the marginal-weighted mean cost,
which is also the ``eps -> inf`` value of ``<P, C>``), so one ``reg`` means the same for any cost and embedding scale.

Host synchronisation: each call reads back one small tensor after solving (whether an unmasked cost entry was NaN/inf,
and the final marginal errors, for the convergence warning), one number per OT problem before iterating (the kernel's
span, which picks the scaling or the log domain, see ``_solve``), and ``tol`` adds one read per convergence check.

Why this is written here rather than taken from POT: ``ot.solve_batch`` needs every problem of the batch to have the
same size, so padding can only be expressed as zero weights (a pair with no real token on a side then comes out NaN);
its ``grad="envelope"`` still records the graph of every iteration (memory like autodiff); its convergence check
synchronises with the host every 10 iterations; and it has no autocast guard for fp16/bf16 inputs.
``benchmarks/speed.py`` measures both side by side, and ``tests/test_ot.py`` checks this solver against POT's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .errors import NonFiniteLossError
from .options import SinkhornOptions

__all__ = [
    "UNCONVERGED_L1",
    "DivergenceResult",
    "OTResult",
    "pairwise_cost",
    "sinkhorn",
    "sinkhorn_divergence",
    "uniform_weights",
]

logger = logging.getLogger(__name__)

GradMode = Literal["envelope", "autodiff"]
Cost = Literal["cosine", "sqeuclidean"]

UNCONVERGED_L1 = 1e-2
"""L1 row-marginal error above which a solve counts as unconverged (warned once per process)."""

_warned_unconverged = False


@dataclass
class OTResult:
    """Solution of a batch of entropic OT problems.

    Attributes:
        plan: ``(batch, n, m)`` transport plans, exactly 0 on masked rows/columns. Detached from the graph in
            ``grad="envelope"`` mode.
        cost: ``(batch,)`` linear transport costs ``<P_b, C_b>``. Differentiable w.r.t. the cost matrix.
        value: ``(batch,)`` regularised values ``<P_b, C_b> + eps_b KL(P_b | a_b (x) w_b)`` (plus
            ``rho_b KL(P_b^T 1 | w_b)`` for a semi-relaxed problem); in envelope mode the KL parts are constants, so
            ``d value / d C = P`` (the envelope theorem, exact once the plan has converged).
        reg: ``(batch,)`` absolute ``eps_b`` used for each pair.
        n_iters: Sinkhorn iterations run (fewer than asked when ``tol`` stopped early).
        marginal_error: ``(batch,)`` L1 error of the row marginals after the last iteration (the column marginals are
            exact after the last column update; a semi-relaxed problem's row marginals are its exact side); 0 for a
            pair with no real token on a side.
        domain: ``"scaling"`` or ``"log"``: where the iterations ran (the kernel's span decides, see ``_solve``).
    """

    plan: torch.Tensor
    cost: torch.Tensor
    value: torch.Tensor
    reg: torch.Tensor
    n_iters: int
    marginal_error: torch.Tensor
    domain: Literal["scaling", "log"]


@dataclass
class DivergenceResult:
    """Sinkhorn divergences of a batch of pairs, with their convergence diagnostics.

    Attributes:
        divergence: ``(batch,)`` ``S_eps`` per pair (0 for a pair with no real token on a side).
        reg: ``(batch,)`` absolute ``eps_b`` shared by the three OT problems of each pair.
        n_iters: the largest number of Sinkhorn iterations run by the three problems.
        marginal_error: ``(batch,)`` the largest final L1 row-marginal error of the three problems.
    """

    divergence: torch.Tensor
    reg: torch.Tensor
    n_iters: int
    marginal_error: torch.Tensor


def uniform_weights(
    mask: torch.Tensor, weights: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Normalise ``weights`` (default: all ones) over the real tokens of each row.

    Args:
        mask: ``(batch, n)`` bool, True for real tokens.
        weights: optional ``(batch, n)`` non-negative weights.
        dtype: floating dtype of the result.

    Returns:
        ``(batch, n)`` float weights summing to 1 over each row's real tokens (a row without real tokens is all 0).
    """
    w = mask.to(dtype) if weights is None else weights.to(dtype) * mask
    return w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, cost: Cost = "cosine") -> torch.Tensor:
    """Token-to-token cost matrices, in fp32 (fp64 stays fp64) with autocast disabled.

    Args:
        x: ``(batch, n, dim)`` token embeddings.
        y: ``(batch, m, dim)`` token embeddings.
        cost: ``"cosine"``: ``1 - cos(x_i, y_j)`` in ``[0, 2]`` (OPTICAL's cost); ``"sqeuclidean"``:
            ``||x_i - y_j||^2`` on the raw embeddings, computed as ``|x|^2 + |y|^2 - 2 x.y`` clamped at 0.

    Returns:
        ``(batch, n, m)`` costs.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"`x` and `y` must have shapes (batch, n, dim) and (batch, m, dim), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
        x, y = x.to(dtype), y.to(dtype)
        if cost == "cosine":
            return 1.0 - torch.bmm(F.normalize(x, dim=-1), F.normalize(y, dim=-1).transpose(1, 2))
        if cost == "sqeuclidean":
            squares = x.pow(2).sum(-1).unsqueeze(2) + y.pow(2).sum(-1).unsqueeze(1)
            return (squares - 2.0 * torch.bmm(x, y.transpose(1, 2))).clamp_min(0.0)
    raise ValueError(f"`cost` must be 'cosine' or 'sqeuclidean', got {cost!r}")


def _full_masks(
    batch: int, n: int, m: int, source_mask: torch.Tensor | None, target_mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if source_mask is None:
        source_mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    if target_mask is None:
        target_mask = torch.ones(batch, m, dtype=torch.bool, device=device)
    if source_mask.shape != (batch, n) or target_mask.shape != (batch, m):
        raise ValueError(
            f"masks must have shapes {(batch, n)} and {(batch, m)} for cost {(batch, n, m)}, "
            f"got {tuple(source_mask.shape)} and {tuple(target_mask.shape)}"
        )
    return source_mask.bool(), target_mask.bool()


@dataclass
class _Problem:
    """A batch of OT problems ready for the solver (masked costs, normalised weights, work dtype)."""

    cost: torch.Tensor  # (batch, n, m), 0 outside real pairs
    source_mask: torch.Tensor  # (batch, n) bool, padding of an empty pair filled in (solved as unmasked, zeroed after)
    target_mask: torch.Tensor  # (batch, m) bool, likewise
    pair_mask: torch.Tensor  # (batch, n, m) bool, the real pairs
    a: torch.Tensor  # (batch, n) row weights
    b: torch.Tensor  # (batch, m) column weights
    nonfinite: torch.Tensor  # (batch,) bool: an unmasked cost entry was NaN/inf

    @property
    def solvable(self) -> torch.Tensor:
        """``(batch,)`` bool: the pair has at least one real token on each side."""
        return self.pair_mask.flatten(1).any(dim=1)

    def log_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``log a`` and ``log b``, finite (``log tiny``) on padded tokens."""
        tiny = torch.finfo(self.a.dtype).tiny
        return self.a.clamp_min(tiny).log(), self.b.clamp_min(tiny).log()

    def independent_cost(self) -> torch.Tensor:
        """``(batch,)`` detached ``<a (x) b, C>``: the cost scale that relative ``reg`` multiplies."""
        with torch.no_grad():
            return torch.einsum("bn,bnm,bm->b", self.a, self.cost, self.b)


def _problem(
    cost: torch.Tensor,
    source_mask: torch.Tensor | None,
    target_mask: torch.Tensor | None,
    source_weights: torch.Tensor | None,
    target_weights: torch.Tensor | None,
) -> _Problem:
    if cost.dim() != 3:
        raise ValueError(f"`cost` must have shape (batch, n, m), got {tuple(cost.shape)}")
    batch, n, m = cost.shape
    source_mask, target_mask = _full_masks(batch, n, m, source_mask, target_mask, cost.device)
    work_dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    pair_mask = source_mask.unsqueeze(2) & target_mask.unsqueeze(1)
    nonfinite = (~torch.isfinite(cost.detach()) & pair_mask).flatten(1).any(dim=1)
    cost = cost.to(work_dtype).masked_fill(~pair_mask, 0.0)
    # A pair with no real token on a side is solved as if unmasked (well defined, no sync) and zeroed afterwards.
    solvable = (source_mask.any(dim=1) & target_mask.any(dim=1)).unsqueeze(1)
    source_mask, target_mask = source_mask | ~solvable, target_mask | ~solvable
    a = uniform_weights(source_mask, source_weights, work_dtype)
    b = uniform_weights(target_mask, target_weights, work_dtype)
    return _Problem(cost, source_mask, target_mask, pair_mask, a, b, nonfinite)


def _absolute_reg(problem: _Problem, options: SinkhornOptions) -> torch.Tensor:
    """``(batch,)`` absolute ``eps_b``: ``reg`` itself, or ``reg * <a (x) b, C>`` floored at the dtype's machine epsilon.

    A pair with no real token on a side gets ``eps = 1`` (its problems are solved for shape only, then zeroed).
    """
    if not options.relative:
        return torch.full(problem.a.shape[:1], float(options.reg), dtype=problem.a.dtype, device=problem.a.device)
    eps = (options.reg * problem.independent_cost()).clamp_min(torch.finfo(problem.a.dtype).eps)
    return torch.where(problem.solvable, eps, 1.0)


def _scaling_shift(rows: torch.Tensor, problem: _Problem, domain: str) -> torch.Tensor | None:
    """``(batch,)`` detached max of the log kernel ``rows`` over each pair's real entries (the scaling domain's
    shift), or ``None`` for the log domain: always with ``domain="log"``, never with ``"scaling"``, and with
    ``"auto"`` when the scaling domain is unsafe: some pair's kernel spans more than ``log(dtype max) / 3`` (29.6 in
    fp32, 236 in fp64) between its largest and smallest real entry, or holds a non-finite one. Within that span the
    kernel and the scalings stay far from overflow and underflow. One host read with ``"auto"``."""
    if domain == "log":
        return None
    with torch.no_grad():
        real = problem.source_mask.unsqueeze(2) & problem.target_mask.unsqueeze(1)
        top = rows.masked_fill(~real, float("-inf")).amax(dim=(1, 2))
        if domain == "scaling":
            return top
        bottom = rows.masked_fill(~real, float("inf")).amin(dim=(1, 2))
        span = (top - bottom).max().item()
    return top if span <= math.log(torch.finfo(rows.dtype).max) / 3 else None


def _log_iterations(
    problem: _Problem, log_kernel: torch.Tensor, rows: torch.Tensor, n_iters: int, tol: float | None,
    check_every: int, symmetric: bool, relax: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Log-domain updates ``u = log a - LSE_j(K + v)``, ``v = log b - relax * LSE_i(K + u)``, stable for any ``eps``.

    Each update masks only the dimension it reduces over, with ``-inf``: every row (column) keeps at least one finite
    entry, so no ``-inf - (-inf)`` appears in values or gradients. The column kernel is a contiguous transposed copy so
    that both reductions run over the last dimension.
    """
    log_a, log_b = problem.log_weights()
    cols = log_kernel.masked_fill(~problem.source_mask.unsqueeze(2), float("-inf")).transpose(1, 2).contiguous()
    v = torch.zeros_like(problem.b)
    for it in range(n_iters):
        if symmetric:
            v = u = 0.5 * (v + log_a - torch.logsumexp(rows + v.unsqueeze(1), dim=2))
        else:
            u = log_a - torch.logsumexp(rows + v.unsqueeze(1), dim=2)
            v = log_b - relax * torch.logsumexp(cols + u.unsqueeze(1), dim=2)
        if tol is not None and (it + 1) % check_every == 0:
            with torch.no_grad():
                row_sums = torch.exp(rows + u.unsqueeze(2) + v.unsqueeze(1)).sum(dim=2)
            if _converged(row_sums, problem, tol):
                return u, v, it + 1
    return u, v, n_iters


def _scaling_iterations(
    problem: _Problem, rows: torch.Tensor, shift: torch.Tensor, n_iters: int, tol: float | None, check_every: int,
    symmetric: bool, relax: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The same iterates in the scaling domain (Sinkhorn & Knopp 1967; Cuturi, NeurIPS 2013), returned as log
    potentials: ``u = a / K v``, ``v = b / (K^T u)^relax`` with ``K = exp(rows - shift)``, a multiply-and-sum per
    update instead of a log-sum-exp (several passes and an ``exp`` over the ``(batch, n, m)`` matrix).

    Safe only for a kernel of bounded span (:func:`_scaling_shift`). Padded rows and columns of ``K`` are 0, so their
    scalings are ``0 / tiny = 0``. The symmetric update is the geometric mean ``u = sqrt(u * a / K u)``.
    """
    tiny = torch.finfo(problem.a.dtype).tiny
    kernel = (rows - shift.view(-1, 1, 1)).masked_fill(~problem.source_mask.unsqueeze(2), float("-inf")).exp()
    kernel_t = kernel.transpose(1, 2).contiguous()

    def times(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:  # (batch, n, m) x (batch, m) -> (batch, n)
        # A multiply-and-sum rather than a batched mat-vec `bmm`, which is slower on CPU for these thin products.
        return (matrix * vector.unsqueeze(1)).sum(dim=2).clamp_min(tiny)

    v = torch.ones_like(problem.b)
    iterations = n_iters
    for it in range(n_iters):
        if symmetric:
            v = u = torch.sqrt(v * problem.a / times(kernel, v))
        else:
            u = problem.a / times(kernel, v)
            column = times(kernel_t, u)
            v = problem.b / (column if isinstance(relax, float) else column.pow(relax))
        if tol is not None and (it + 1) % check_every == 0:
            with torch.no_grad():
                row_sums = u * times(kernel, v)
            if _converged(row_sums, problem, tol):
                iterations = it + 1
                break
    log_u, log_v = u.clamp_min(tiny).log(), v.clamp_min(tiny).log()
    if symmetric:  # u K u = u' K' u' with K' = K e^-shift, u' = u e^(shift / 2)
        return log_u - 0.5 * shift.unsqueeze(1), log_v - 0.5 * shift.unsqueeze(1), iterations
    return log_u - shift.unsqueeze(1), log_v, iterations


def _converged(row_sums: torch.Tensor, problem: _Problem, tol: float) -> bool:
    """Whether every pair's L1 row-marginal error is below ``tol`` (one host read)."""
    return ((row_sums - problem.a) * problem.source_mask).abs().sum(dim=1).max().item() < tol


def _solve(
    problem: _Problem, eps: torch.Tensor, options: SinkhornOptions, symmetric: bool = False,
    rho: torch.Tensor | None = None,
) -> OTResult:
    """Sinkhorn, ``u = log a - LSE_j(K + v)``, ``v = log b - LSE_i(K + u)`` in the log potentials ``u, v``.

    With ``options.domain="auto"`` the iterations run in the scaling domain when the kernel's span allows it
    (:func:`_scaling_shift`: a large ``eps`` such as the shipped recipe's relative ``reg=1``) and in the log domain
    otherwise (a small ``eps``): the same iterates up to rounding, so iteration counts and plans agree. The scaling domain is cheaper per iteration (two
    multiply-and-sums instead of two log-sum-exps over the matrix); ``benchmarks/speed.py`` times the objective.

    ``symmetric=True`` (a problem ``OT(a, a)`` with a symmetric cost) uses the averaged update of Feydy et al. (2019),
    ``u <- (u + log a - LSE_j(K + u)) / 2``, ``v = u``: the plain alternating updates oscillate on these problems and
    converge far more slowly. ``rho`` (``(batch,)``, absolute) relaxes the column marginals:
    ``v = log b - rho / (rho + eps) * LSE_i(K + u)`` (derived in :func:`sinkhorn`).
    """
    log_a, log_b = problem.log_weights()
    relax = 1.0 if rho is None else (rho / (rho + eps)).unsqueeze(1)
    n_iters, tol, check_every = options.n_iters, options.tol, options.check_every
    with torch.set_grad_enabled(options.grad == "autodiff" and torch.is_grad_enabled()):
        log_kernel = -problem.cost / eps.view(-1, 1, 1)
        rows = log_kernel.masked_fill(~problem.target_mask.unsqueeze(1), float("-inf"))  # the row update's mask
        shift = _scaling_shift(rows, problem, options.domain)
        if shift is None:
            u, v, iterations = _log_iterations(problem, log_kernel, rows, n_iters, tol, check_every, symmetric, relax)
        else:
            u, v, iterations = _scaling_iterations(problem, rows, shift, n_iters, tol, check_every, symmetric, relax)
        log_plan = (rows + u.unsqueeze(2) + v.unsqueeze(1)).masked_fill(~problem.pair_mask, float("-inf"))
        plan = log_plan.exp()
        # KL(P | a (x) b) = sum P log(P / (a_i b_j)) - sum P + 1, over the real pairs (0 log 0 = 0).
        log_ratio = (log_plan - log_a.unsqueeze(2) - log_b.unsqueeze(1)).masked_fill(~problem.pair_mask, 0.0)
        kl = (plan * log_ratio).sum(dim=(1, 2)) - plan.sum(dim=(1, 2)) + problem.solvable.to(plan.dtype)
        penalty = 0.0 if rho is None else rho * _column_kl(plan, problem, log_b)
    with torch.no_grad():
        row_error = ((plan.sum(dim=2) - problem.a) * problem.source_mask).abs().sum(dim=1) * problem.solvable
    linear = (plan * problem.cost).sum(dim=(1, 2))
    return OTResult(
        plan=plan, cost=linear, value=linear + eps * kl + penalty, reg=eps, n_iters=iterations,
        marginal_error=row_error, domain="log" if shift is None else "scaling",
    )


def _column_kl(plan: torch.Tensor, problem: _Problem, log_b: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` ``KL(P^T 1 | b) = sum_j s_j log(s_j / b_j) - s_j + b_j`` over the real target tokens (0 if none)."""
    s = plan.sum(dim=1)
    terms = torch.special.xlogy(s, s) - s * log_b - s + problem.b
    return (terms * problem.target_mask).sum(dim=1) * problem.solvable


def _report(nonfinite: torch.Tensor, marginal_error: torch.Tensor, eps: torch.Tensor, n_iters: int,
            options: SinkhornOptions) -> None:
    """The call's one host sync: raise on NaN/inf costs, warn (once per process) on an unconverged solve."""
    global _warned_unconverged
    flags, errors, epsilons = torch.stack([nonfinite.to(eps.dtype), marginal_error.to(eps.dtype), eps]).tolist()
    bad = [k for k, flag in enumerate(flags) if flag]
    if bad:
        raise NonFiniteLossError(f"the cost matrix has NaN or inf entries between real tokens in pair(s) {bad} of the "
                                 "batch (the token states are not finite: lower the learning rate or check the data)")
    worst = max(range(len(errors)), key=errors.__getitem__, default=None)
    if worst is None or errors[worst] <= UNCONVERGED_L1 or _warned_unconverged:
        return
    _warned_unconverged = True
    reg = options.reg
    kind = f"relative reg={reg:g}, i.e. eps={epsilons[worst]:.3g}" if options.relative else f"reg=eps={reg:g}"
    logger.warning(
        "Sinkhorn did not converge: L1 marginal error %.3g (> %g) after %d iterations at %s. Raise n_iters (or reg: "
        "a larger reg converges in fewer iterations). This warning is shown once per process.",
        errors[worst], UNCONVERGED_L1, n_iters, kind,
    )


def sinkhorn(
    cost: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    options: SinkhornOptions = SinkhornOptions(),
    *,
    source_weights: torch.Tensor | None = None,
    target_weights: torch.Tensor | None = None,
    rho: float | None = None,
) -> OTResult:
    """Entropic OT between the real tokens of each pair of a batch, in fp32 whatever the input dtype.

    With ``rho`` the problem is *semi-relaxed*: the source marginal stays exact and the target marginal is penalised
    by a KL divergence (Chizat, Peyré, Schmitzer & Vialard, "Scaling algorithms for unbalanced optimal transport
    problems", Math. Comp. 2018; Séjourné, Feydy, Vialard, Trouvé & Peyré, "Sinkhorn divergences for unbalanced
    optimal transport", 2019):

    .. math::

        \\min_{P \\ge 0,\\ P 1 = a} \\langle P, C \\rangle + \\varepsilon \\mathrm{KL}(P \\,|\\, a \\otimes b)
            + \\rho \\mathrm{KL}(P^T 1 \\,|\\, b)

    (generalised KL, ``KL(p | q) = sum p log(p / q) - p + q``). Stationarity with a multiplier ``f`` for
    ``P 1 = a`` gives ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` with ``g_j = -rho log(s_j / b_j)``,
    ``s = P^T 1``. Substituting ``s`` and solving the fixed point for ``g_j`` gives
    ``g_j = -(rho eps / (rho + eps)) LSE_i(log a_i + (f_i - C_ij) / eps)``. In the scaled potentials of the solver,
    ``u_i = log a_i + f_i / eps``, ``v_j = log b_j + g_j / eps`` (``P = exp(u_i - C_ij / eps + v_j)``), the updates are

    .. math::

        u \\leftarrow \\log a - \\mathrm{LSE}_j(-C / \\varepsilon + v), \\qquad
        v \\leftarrow \\log b - \\tfrac{\\rho}{\\rho + \\varepsilon} \\mathrm{LSE}_i(-C / \\varepsilon + u),

    the log form of Chizat et al.'s ``v = (b / K^T u)^(rho / (rho + eps))`` with the kernel ``K = (a (x) b) e^(-C/eps)``
    (POT's ``ot.unbalanced.sinkhorn_unbalanced(a, b, C, eps, reg_m=(inf, rho))``). (With the reference ``1`` instead
    of ``a (x) b``, i.e. ``-eps H(P)``, the factor would multiply ``log b`` too; here the reference is the one of the
    balanced problem.) ``rho -> inf`` recovers balanced OT; ``rho -> 0`` gives ``v = log b``, so each row is
    ``P_i = a_i softmax_j(log b_j - C_ij / eps)`` over the real target tokens (with uniform ``b``:
    ``a_i softmax(-C_i / eps)``, a soft MaxSim alignment of each source token).

    Args:
        cost: ``(batch, n, m)`` cost matrices (e.g. :func:`pairwise_cost`). Any float dtype; solved in fp32 (fp64 stays
            fp64) with autocast disabled, so fp16/bf16 activations are safe. NaN/inf between real tokens raises
            :class:`optical_hf.NonFiniteLossError` (``optical-hf`` reports it in one line); padded entries may hold anything.
        source_mask: ``(batch, n)`` bool, True for real source tokens. Default: all real.
        target_mask: ``(batch, m)`` bool, True for real target tokens. Default: all real.
        options: the solver's :class:`optical_hf.SinkhornOptions` (``reg``, relative or absolute, ``n_iters``,
            ``tol``, ``check_every``, ``grad``, ``domain``); the default is the shipped objective's (relative
            ``reg=1``). A smaller ``reg`` is sharper and closer to exact OT (``ot.emd``) but needs more iterations.
            ``grad="envelope"`` solves without building a graph; the plan ``P*`` is detached, so the gradient of
            ``cost`` and ``value`` w.r.t. ``C`` is ``P*``: by the envelope theorem that is the gradient of the
            regularised value ``OT_eps``, exact once the plan has converged (see ``marginal_error``), at no extra
            memory. ``"autodiff"`` back-propagates through every iteration (memory grows with ``n_iters``).
        source_weights: optional ``(batch, n)`` marginal weights, renormalised over real tokens. Default uniform.
        target_weights: optional ``(batch, m)`` marginal weights, likewise.
        rho: ``None`` (default): balanced OT. A finite number > 0: the KL penalty of the relaxed target marginal, in
            the units of ``reg`` (relative with a relative ``reg``: ``rho_b = rho * eps_b / reg``, so the update's
            factor ``rho / (rho + reg)`` is the same for every pair and cost scale).

    Returns:
        :class:`OTResult` (``plan`` ``(batch, n, m)``, ``cost`` and ``value`` ``(batch,)``, ``reg``, ``n_iters``,
        ``marginal_error``). A pair with no real token on one side gets a zero plan, cost and value. A final L1
        marginal error above :data:`UNCONVERGED_L1` logs a warning once per process. Two host syncs per call (the domain
        choice and the report), plus one per check with ``tol``.

    Example::

        >>> C = pairwise_cost(x, y, "cosine")  # (B, n, m)
        >>> res = sinkhorn(C, x_mask, y_mask, SinkhornOptions(reg=0.05))
        >>> loss = res.cost.mean()
    """
    if not isinstance(options, SinkhornOptions):
        raise TypeError(f"`options` must be a SinkhornOptions, got {type(options).__name__}")
    if rho is not None and not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"`rho` must be None or a finite number > 0, got {rho}")
    with torch.autocast(device_type=cost.device.type, enabled=False):
        problem = _problem(cost, source_mask, target_mask, source_weights, target_weights)
        eps = _absolute_reg(problem, options)
        absolute_rho = None if rho is None else eps * (rho / options.reg) if options.relative else torch.full_like(eps, rho)
        result = _solve(problem, eps, options, rho=absolute_rho)
    _report(problem.nonfinite, result.marginal_error, eps, result.n_iters, options)
    return result


def sinkhorn_divergence(
    x: torch.Tensor,
    x_mask: torch.Tensor | None,
    y: torch.Tensor,
    y_mask: torch.Tensor | None,
    options: SinkhornOptions = SinkhornOptions(),
    *,
    cost: Cost = "sqeuclidean",
    x_weights: torch.Tensor | None = None,
    y_weights: torch.Tensor | None = None,
) -> DivergenceResult:
    """Debiased Sinkhorn divergence between the token clouds of each pair (Feydy et al., AISTATS 2019, Eq. 5).

    .. math::

        S_\\varepsilon(\\alpha, \\beta) = \\mathrm{OT}_\\varepsilon(\\alpha, \\beta)
            - \\tfrac12 \\mathrm{OT}_\\varepsilon(\\alpha, \\alpha) - \\tfrac12 \\mathrm{OT}_\\varepsilon(\\beta, \\beta),
        \\qquad \\mathrm{OT}_\\varepsilon = \\langle P, C \\rangle + \\varepsilon \\mathrm{KL}(P \\,|\\, a \\otimes b)

    with ``alpha = sum_i a_i delta_{x_i}``, ``beta = sum_j b_j delta_{y_j}``. For a positive-definite kernel cost such
    as ``sqeuclidean``, ``S_eps >= 0`` with equality iff ``alpha = beta``; ``S_eps -> OT_0`` as ``eps -> 0`` and,
    for ``sqeuclidean``, ``S_eps -> ||sum_i a_i x_i - sum_j b_j y_j||^2`` as ``eps -> inf``. The three problems share
    the same ``eps_b`` (relative: ``reg * <a (x) b, C_xy>``), so ``S_eps(alpha, alpha) = 0`` exactly.

    Args:
        x: ``(batch, n, dim)`` embeddings of the first clouds.
        x_mask: ``(batch, n)`` bool, True for real tokens (``None``: all real).
        y: ``(batch, m, dim)`` embeddings of the second clouds.
        y_mask: ``(batch, m)`` bool (``None``: all real).
        options: the :class:`optical_hf.SinkhornOptions` of the three problems, as in :func:`sinkhorn` (a relative
            ``reg`` is relative to the cross cost scale).
        cost: ``"sqeuclidean"`` (default) or ``"cosine"``, see :func:`pairwise_cost`.
        x_weights / y_weights: optional ``(batch, n)`` / ``(batch, m)`` weights, renormalised over real tokens.

    Returns:
        A :class:`DivergenceResult`: ``divergence`` ``(batch,)`` (0 for a pair with no real token on a side) with its
        diagnostics. Four host syncs per call with ``domain="auto"`` (a domain choice per problem and the report;
        plus ``tol`` checks); an unconverged solve warns once per process as in :func:`sinkhorn`.
    """
    if not isinstance(options, SinkhornOptions):
        raise TypeError(f"`options` must be a SinkhornOptions, got {type(options).__name__}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        cross = _problem(pairwise_cost(x, y, cost), x_mask, y_mask, x_weights, y_weights)
        eps = _absolute_reg(cross, options)
        problems = [
            cross,
            _problem(pairwise_cost(x, x, cost), x_mask, x_mask, x_weights, x_weights),
            _problem(pairwise_cost(y, y, cost), y_mask, y_mask, y_weights, y_weights),
        ]
        xy, xx, yy = (
            _solve(p, eps, options, symmetric=p is not cross) for p in problems
        )
        divergence = torch.where(cross.solvable, xy.value - 0.5 * (xx.value + yy.value), 0.0)
    nonfinite = torch.stack([p.nonfinite for p in problems]).any(dim=0)
    marginal_error = torch.stack([r.marginal_error for r in (xy, xx, yy)]).amax(dim=0)
    n_run = max(r.n_iters for r in (xy, xx, yy))
    _report(nonfinite, marginal_error, eps, n_run, options)
    return DivergenceResult(divergence=divergence, reg=eps, n_iters=n_run, marginal_error=marginal_error)
