"""Batched, masked entropic optimal transport (log-domain Sinkhorn) for token alignment.

For each pair ``b`` of a batch this solves

.. math::

    P_b = \\arg\\min_{P \\ge 0,\\ P 1 = a_b,\\ P^T 1 = w_b} \\langle P, C_b \\rangle_F - \\varepsilon H(P),
    \\qquad \\text{cost}_b = \\langle P_b, C_b \\rangle_F

where ``a_b`` and ``w_b`` are probability weights over the *real* (unmasked) tokens of the two sides.
OPTICAL (Huang, Yu & Allan, WSDM 2023, Sec. 3) uses the plan ``P`` as a soft token alignment between the
student's tokens of a low-resource sentence and the teacher's tokens of its English translation and trains
the student on ``<P, C>``.

Why this is written here rather than taken from POT: ``ot.solve_batch`` needs every problem of the batch to
have the same size, so padding can only be expressed as zero weights (a pair with no real token on a side then
comes out NaN); its ``grad="envelope"`` still records the graph of every iteration (memory like autodiff); its
convergence check synchronises with the host every 10 iterations; and it has no autocast guard for fp16/bf16
inputs. ``benchmarks/speed.py`` measures both side by side. POT remains available as ``backend="pot"`` and is the
reference the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["OTResult", "sinkhorn", "uniform_weights"]

GradMode = Literal["envelope", "autodiff"]
Backend = Literal["torch", "pot"]

@dataclass
class OTResult:
    """Solution of a batch of entropic OT problems.

    Attributes:
        plan: ``(batch, n, m)`` transport plans, exactly 0 on masked rows/columns. Detached from the graph in
            ``grad="envelope"`` mode.
        cost: ``(batch,)`` transport costs ``<P_b, C_b>``. Differentiable w.r.t. the cost matrix in both modes.
    """

    plan: torch.Tensor
    cost: torch.Tensor


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


def _scaled_potentials(
    log_kernel: torch.Tensor,
    source_mask: torch.Tensor,
    target_mask: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    n_iters: int,
    tol: float | None,
    check_every: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn on ``K = -C / reg``: ``u = log a - LSE_j(K + v)``, ``v = log b - LSE_i(K + u)``.

    Each update masks only the dimension it reduces over, with ``-inf``: every row (column) keeps at least one finite
    entry, so no ``-inf - (-inf)`` appears in values or gradients, and ``exp(-inf)`` is the cheapest exp there is. The
    column update reads a contiguous transposed copy of ``K`` so that both reductions run over the last dimension.
    Both masks must have at least one True per pair. Without ``tol`` the loop runs exactly ``n_iters`` times and never
    synchronises with the host; with ``tol`` the largest L1 error of the row marginals is read back every
    ``check_every`` iterations (one sync per check).

    Returns:
        ``(u, v)``: ``(batch, n)`` and ``(batch, m)`` scaled potentials (``f / reg``, ``g / reg``).
    """
    tiny = torch.finfo(a.dtype).tiny
    log_a, log_b = a.clamp_min(tiny).log(), b.clamp_min(tiny).log()
    row_kernel = log_kernel.masked_fill(~target_mask.unsqueeze(1), float("-inf"))  # (batch, n, m), reduce over m
    col_kernel = log_kernel.masked_fill(~source_mask.unsqueeze(2), float("-inf")).transpose(1, 2).contiguous()
    v = torch.zeros_like(b)
    for it in range(n_iters):
        u = log_a - torch.logsumexp(row_kernel + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(col_kernel + u.unsqueeze(1), dim=2)
        if tol is not None and (it + 1) % check_every == 0:
            with torch.no_grad():
                rows = torch.exp(row_kernel + u.unsqueeze(2) + v.unsqueeze(1)).sum(dim=2)
                if ((rows - a) * source_mask).abs().sum(dim=1).max().item() < tol:
                    break
    return u, v


def sinkhorn(
    cost: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    *,
    reg: float = 0.05,
    source_weights: torch.Tensor | None = None,
    target_weights: torch.Tensor | None = None,
    n_iters: int = 50,
    tol: float | None = None,
    check_every: int = 10,
    grad: GradMode = "envelope",
    backend: Backend = "torch",
) -> OTResult:
    """Entropic OT between the real tokens of each pair of a batch, in fp32 whatever the input dtype.

    Args:
        cost: ``(batch, n, m)`` cost matrices (e.g. ``1 - cosine``). Any float dtype; solved in fp32 (fp64 stays
            fp64) with autocast disabled, so fp16/bf16 activations are safe.
        source_mask: ``(batch, n)`` bool, True for real source tokens. Default: all real.
        target_mask: ``(batch, m)`` bool, True for real target tokens. Default: all real.
        reg: entropic regularisation ``epsilon``, in the units of ``cost``. Smaller is sharper and closer to exact OT
            (``ot.emd``) but needs more iterations; the log domain keeps it stable down to ``1e-3`` on cosine costs.
        source_weights: optional ``(batch, n)`` marginal weights, renormalised over real tokens. Default uniform.
        target_weights: optional ``(batch, m)`` marginal weights, likewise.
        n_iters: Sinkhorn iterations (the maximum when ``tol`` is set).
        tol: stop when the row marginals are within ``tol`` (L1). ``None`` (default) runs ``n_iters`` iterations
            with no host synchronisation at all; a value costs one sync every ``check_every`` iterations.
        check_every: iterations between two convergence checks when ``tol`` is set.
        grad: ``"envelope"`` (default) solves without building a graph and returns ``<P*, C>`` with ``P*`` detached:
            by the envelope theorem ``d OT_eps / d C = P*``, so the gradient is exact for the regularised objective
            at no extra memory. ``"autodiff"`` back-propagates through every iteration (memory grows with
            ``n_iters``; also differentiates the plan).
        backend: ``"torch"`` (this solver) or ``"pot"`` (``ot.solve_batch`` with ``method="log_sinkhorn"``, padding
            expressed as zero weights, empty pairs zeroed; ``grad="envelope"`` only: it is offered as a reference
            solver, not as a second training path).

    Returns:
        :class:`OTResult` with ``plan`` ``(batch, n, m)`` and ``cost`` ``(batch,)``. A pair with no real token on
        one side gets a zero plan and zero cost.

    Example::

        >>> C = 1 - torch.nn.functional.cosine_similarity(x[:, :, None], y[:, None], dim=-1)  # (B, n, m)
        >>> res = sinkhorn(C, x_mask, y_mask, reg=0.05)
        >>> loss = res.cost.mean()
    """
    if cost.dim() != 3:
        raise ValueError(f"`cost` must have shape (batch, n, m), got {tuple(cost.shape)}")
    if reg <= 0:
        raise ValueError(f"`reg` must be > 0, got {reg}")
    if grad not in ("envelope", "autodiff"):
        raise ValueError(f"`grad` must be 'envelope' or 'autodiff', got {grad!r}")
    batch, n, m = cost.shape
    if source_mask is None:
        source_mask = torch.ones(batch, n, dtype=torch.bool, device=cost.device)
    if target_mask is None:
        target_mask = torch.ones(batch, m, dtype=torch.bool, device=cost.device)
    if source_mask.shape != (batch, n) or target_mask.shape != (batch, m):
        raise ValueError(
            f"masks must have shapes {(batch, n)} and {(batch, m)} for cost {tuple(cost.shape)}, "
            f"got {tuple(source_mask.shape)} and {tuple(target_mask.shape)}"
        )
    source_mask, target_mask = source_mask.bool(), target_mask.bool()

    with torch.autocast(device_type=cost.device.type, enabled=False):
        work_dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
        pair_mask = source_mask.unsqueeze(2) & target_mask.unsqueeze(1)
        cost = cost.to(work_dtype).masked_fill(~pair_mask, 0.0)
        if backend == "pot":
            a = uniform_weights(source_mask, source_weights, work_dtype)
            b = uniform_weights(target_mask, target_weights, work_dtype)
            return _pot_sinkhorn(cost, a, b, reg=reg, n_iters=n_iters, tol=tol, grad=grad)
        if backend != "torch":
            raise ValueError(f"`backend` must be 'torch' or 'pot', got {backend!r}")

        # A pair with no real token on a side is solved as if unmasked (well defined, no sync) and zeroed below.
        solvable = (source_mask.any(dim=1) & target_mask.any(dim=1)).unsqueeze(1)
        solved_source, solved_target = source_mask | ~solvable, target_mask | ~solvable
        a = uniform_weights(solved_source, source_weights, work_dtype)
        b = uniform_weights(solved_target, target_weights, work_dtype)
        with torch.set_grad_enabled(grad == "autodiff" and torch.is_grad_enabled()):
            log_kernel = -cost / reg
            u, v = _scaled_potentials(log_kernel, solved_source, solved_target, a, b, n_iters, tol, check_every)
            log_plan = (log_kernel + u.unsqueeze(2) + v.unsqueeze(1)).masked_fill(~pair_mask, float("-inf"))
            plan = log_plan.exp()
        return OTResult(plan=plan, cost=(plan * cost).sum(dim=(1, 2)))


def _pot_sinkhorn(
    cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float, n_iters: int, tol: float | None, grad: str
) -> OTResult:
    """Solve with POT's batched log-Sinkhorn (``ot.solve_batch``) on the same inputs."""
    if grad != "envelope":
        raise ValueError("backend='pot' supports grad='envelope' only (it is a reference solver, not a training path)")
    from ot import solve_batch

    res = solve_batch(
        M=cost, reg=reg, a=a, b=b, max_iter=n_iters, tol=0.0 if tol is None else tol, method="log_sinkhorn",
        grad="envelope",
    )
    plan = res.plan.detach().masked_fill((a.unsqueeze(2) == 0) | (b.unsqueeze(1) == 0), 0.0)
    return OTResult(plan=plan, cost=(plan * cost).sum(dim=(1, 2)))
