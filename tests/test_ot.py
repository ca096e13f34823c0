"""Tests for optical_hf.ot: sinkhorn's agreement with POT (per-pair log-Sinkhorn, batched ``ot.solve_batch``, exact
``ot.emd2`` as reg -> 0), weights and marginals, gradients (gradcheck, envelope theorem), numerical stability (small reg,
extreme padding, empty pairs, fp16/bf16, autocast, NaN padding), early stopping, convergence diagnostics, input
validation and batch invariance; the Sinkhorn divergence's limits (sentence-level MSE as reg -> inf, exact OT as
reg -> 0), positivity, padding invariance; pairwise costs."""

from __future__ import annotations

import logging

import ot
import pytest
import torch
from torch.nn.functional import cosine_similarity

import optical_hf.ot as ot_module
from optical_hf import NonFiniteLossError
from optical_hf.ot import DivergenceResult, OTResult, pairwise_cost, sinkhorn, sinkhorn_divergence, uniform_weights
from optical_hf.options import SinkhornOptions

# Tolerances. In float64 both solvers run the same fixed-point iteration (ours in either domain), so once converged
# (marginal error far below 1e-10) plans agree to rounding: 1e-8 absolute on plan entries of size ~1/(n*m) ~ 1e-2
# leaves a wide margin.
PLAN_ATOL_F64 = 1e-8
COST_ATOL_F64 = 1e-8
# Same iteration count and the same update order as ot.solve_batch: the two agree to rounding even before convergence.
SAME_ITERATION_ATOL_F64 = 1e-10
# float32 accumulates ~1e-7 relative rounding per logsumexp: converged float32 plans agree to a few 1e-7.
PLAN_ATOL_F32 = 1e-5
# reg -> 0: with reg = 1e-3 the entropic plan's linear cost is within 1e-3 (relative) of the exact ot.emd2 cost.
EMD_RTOL = 1e-3
# fp16 / bf16 inputs vs the float32 solution of the unrounded costs (reg = 0.1, costs in [0, 2]): rounding the cost by
# delta changes <P, C> by about delta (fp16: 2**-10, bf16: 2**-7 relative) and plan entries by a factor exp(delta / reg).
LOW_PRECISION_COST_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
LOW_PRECISION_PLAN_ATOL = {torch.float16: 2e-4, torch.bfloat16: 2e-3}
# Marginal L1 error reached by converged float64 solves.
MARGINAL_ATOL_F64 = 1e-9

BATCH, N, M = 4, 7, 9
# Real tokens per pair (source, target): every pair is padded differently, pair 0 is full on both sides.
LENGTHS = ((7, 9), (5, 3), (2, 8), (6, 6))


def random_masks(lengths, n, m, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch, n)`` and ``(batch, m)`` bool masks with the given numbers of real tokens at random positions."""
    source = torch.zeros(len(lengths), n, dtype=torch.bool)
    target = torch.zeros(len(lengths), m, dtype=torch.bool)
    for k, (ns, nt) in enumerate(lengths):
        source[k, torch.randperm(n, generator=generator)[:ns]] = True
        target[k, torch.randperm(m, generator=generator)[:nt]] = True
    return source, target


def cosine_cost(batch, n, m, dim=16, seed=0, dtype=torch.float64) -> torch.Tensor:
    """``(batch, n, m)`` cost ``1 - cos`` between random token embeddings."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=g, dtype=dtype)
    y = torch.randn(batch, m, dim, generator=g, dtype=dtype)
    return 1 - cosine_similarity(x[:, :, None], y[:, None], dim=-1)


def make_cost(kind: str, batch=BATCH, n=N, m=M, seed=0, dtype=torch.float64) -> torch.Tensor:
    if kind == "cosine":
        return cosine_cost(batch, n, m, seed=seed, dtype=dtype)
    return torch.rand(batch, n, m, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def padded_instance(kind: str, seed=0, dtype=torch.float64):
    cost = make_cost(kind, seed=seed, dtype=dtype)
    source_mask, target_mask = random_masks(LENGTHS, N, M, torch.Generator().manual_seed(seed + 1))
    return cost, source_mask, target_mask


def block(x: torch.Tensor, k: int, source_mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """The real-token block of pair ``k`` of a ``(batch, n, m)`` tensor."""
    return x[k][source_mask[k]][:, target_mask[k]]


def assert_padding_is_zero(plan, source_mask, target_mask):
    pair_mask = source_mask[:, :, None] & target_mask[:, None, :]
    assert torch.all(plan[~pair_mask] == 0), "padded rows/columns of the plan must be exactly 0"


def assert_finite(*tensors):
    for t in tensors:
        assert torch.isfinite(t).all(), f"non-finite values in tensor of shape {tuple(t.shape)}"


DOMAIN = "auto"
"""The ``SinkhornOptions.domain`` of every :func:`solve` and :func:`divergence` call (the ``domain`` fixture sets it)."""


@pytest.fixture(params=["log", "scaling"])
def domain(request, monkeypatch) -> str:
    """Run the Sinkhorn iterations of the test in one domain whatever the kernel's span."""
    monkeypatch.setattr(f"{__name__}.DOMAIN", request.param)
    return request.param


def solve(cost, source_mask=None, target_mask=None, *, reg=0.05, relative_reg=False, n_iters=50, tol=None,
          check_every=10, grad="envelope", backend="torch", **kwargs) -> OTResult:
    """:func:`sinkhorn` with the options of these tests spelt out as keywords (default: absolute ``reg`` 0.05, 50
    iterations, no ``tol``), in the domain :data:`DOMAIN`; ``backend="pot"`` solves the same problem with POT's
    batched log-Sinkhorn instead (:func:`pot_solve`)."""
    if backend == "pot":
        assert not relative_reg and grad == "envelope" and not kwargs, "POT's reference: absolute reg, envelope only"
        return pot_solve(cost, source_mask, target_mask, reg=reg, n_iters=n_iters, tol=tol)
    options = SinkhornOptions(reg=reg, relative=relative_reg, n_iters=n_iters, tol=tol, check_every=check_every,
                              grad=grad, domain=DOMAIN)
    return sinkhorn(cost, source_mask, target_mask, options, **kwargs)


def pot_solve(cost, source_mask, target_mask, *, reg: float, n_iters: int, tol: float | None) -> OTResult:
    """The reference: POT's ``ot.solve_batch(method="log_sinkhorn")`` on the same padded problem as :func:`sinkhorn`
    (padding as zero weights, a pair with no real token on a side zeroed afterwards, absolute ``reg``)."""
    problem = ot_module._problem(cost, source_mask, target_mask, None, None)
    a = problem.a * problem.pair_mask.any(dim=2)
    b = problem.b * problem.pair_mask.any(dim=1)
    res = ot.solve_batch(M=problem.cost, reg=reg, a=a, b=b, max_iter=n_iters, tol=0.0 if tol is None else tol,
                         method="log_sinkhorn", grad="envelope")
    plan = res.plan.detach().masked_fill(~problem.pair_mask, 0.0)
    linear = (plan * problem.cost).sum(dim=(1, 2))
    return OTResult(plan=plan, cost=linear, value=torch.where(problem.solvable, res.value.detach(), 0.0),
                    reg=torch.full_like(linear, reg), n_iters=int(res.log["n_iter"]) + 1,
                    marginal_error=(plan.sum(dim=2) - a).abs().sum(dim=1) * problem.solvable, domain="log")


def divergence_result(x, x_mask, y, y_mask, *, reg, relative_reg=True, n_iters=100, tol=None, check_every=10,
                      grad="envelope", **kwargs) -> DivergenceResult:
    """:func:`sinkhorn_divergence` with its options as keywords (default: relative ``reg``, 100 iterations, no
    ``tol``), in the domain :data:`DOMAIN`."""
    options = SinkhornOptions(reg=reg, relative=relative_reg, n_iters=n_iters, tol=tol, check_every=check_every,
                              grad=grad, domain=DOMAIN)
    return sinkhorn_divergence(x, x_mask, y, y_mask, options, **kwargs)


def divergence(*args, **kwargs) -> torch.Tensor:
    """``(batch,)`` divergences of :func:`divergence_result`."""
    return divergence_result(*args, **kwargs).divergence


def assert_reports_iterations_run(result: OTResult, cost, source_mask, target_mask, **kwargs) -> None:
    """``result.n_iters`` is the number of iterations run: the same solve without ``tol``, stopped after exactly that
    many, gives the same plan bit for bit (the convergence checks read the state but never change it)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("tol", "check_every", "n_iters")}
    replay = solve(cost, source_mask, target_mask, n_iters=result.n_iters, **kwargs)
    assert torch.equal(replay.plan, result.plan), f"the plan is not the one of {result.n_iters} iterations"


# 1. Agreement with POT's per-pair log-domain Sinkhorn.


@pytest.mark.parametrize("kind", ["cosine", "uniform"])
@pytest.mark.parametrize("reg", [0.05, 0.5])
def test_matches_pot_sinkhorn_log_per_pair(domain, kind, reg):
    cost, source_mask, target_mask = padded_instance(kind)
    res = solve(cost, source_mask, target_mask, reg=reg, n_iters=1000)

    assert isinstance(res, OTResult)
    assert res.plan.shape == (BATCH, N, M) and res.cost.shape == (BATCH,)
    assert res.plan.dtype == res.cost.dtype == torch.float64
    assert_padding_is_zero(res.plan, source_mask, target_mask)
    for k, (ns, nt) in enumerate(LENGTHS):
        c = block(cost, k, source_mask, target_mask)
        a = torch.full((ns,), 1 / ns, dtype=torch.float64)
        b = torch.full((nt,), 1 / nt, dtype=torch.float64)
        expected = ot.bregman.sinkhorn_log(a, b, c, reg, numItermax=10_000, stopThr=1e-13)
        torch.testing.assert_close(block(res.plan, k, source_mask, target_mask), expected, atol=PLAN_ATOL_F64, rtol=0)
        torch.testing.assert_close(res.cost[k], (expected * c).sum(), atol=COST_ATOL_F64, rtol=0)


# 2. Agreement with POT's batched solver (the reference pot_solve) on padded batches.


@pytest.mark.parametrize("kind", ["cosine", "uniform"])
def test_matches_pot_solve_batch_unpadded(kind):
    cost = make_cost(kind)
    reg, n_iters = 0.1, 100
    res = solve(cost, reg=reg, n_iters=n_iters)
    expected = ot.solve_batch(M=cost, reg=reg, max_iter=n_iters, tol=0.0, method="log_sinkhorn")

    torch.testing.assert_close(res.plan, expected.plan, atol=SAME_ITERATION_ATOL_F64, rtol=0)
    torch.testing.assert_close(res.cost, expected.value_linear, atol=SAME_ITERATION_ATOL_F64, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, PLAN_ATOL_F64), (torch.float32, PLAN_ATOL_F32)])
def test_pot_backend_matches_torch_backend_with_padding(domain, dtype, atol):
    cost, source_mask, target_mask = padded_instance("cosine", dtype=dtype)
    cost.requires_grad_(True)
    # Converged solutions are compared (this float32 instance needs ~1000 iterations): before convergence the iterates
    # may legitimately differ by how the first row update treats padded columns.
    torch_res = solve(cost, source_mask, target_mask, reg=0.05, n_iters=2000)
    pot_res = solve(cost, source_mask, target_mask, reg=0.05, n_iters=2000, backend="pot")

    assert pot_res.plan.dtype == pot_res.cost.dtype == dtype
    assert_padding_is_zero(pot_res.plan, source_mask, target_mask)
    torch.testing.assert_close(pot_res.plan, torch_res.plan, atol=atol, rtol=0)
    torch.testing.assert_close(pot_res.cost, torch_res.cost, atol=atol, rtol=0)
    (grad_pot,) = torch.autograd.grad(pot_res.cost.sum(), cost)
    (grad_torch,) = torch.autograd.grad(torch_res.cost.sum(), cost)
    torch.testing.assert_close(grad_pot, grad_torch, atol=atol, rtol=0)


# 3. reg -> 0 approaches exact OT.


@pytest.mark.parametrize("kind", ["cosine", "uniform"])
def test_small_reg_approaches_exact_emd(kind):
    cost, source_mask, target_mask = padded_instance(kind)
    # Convergence at reg = 1e-3 is slow (one cosine pair still has a 4e-5 marginal error after 20k iterations), so the
    # plan need not be exactly feasible and its cost may fall marginally below the exact one: compare within EMD_RTOL.
    res = solve(cost, source_mask, target_mask, reg=1e-3, n_iters=5000, tol=1e-9, check_every=50)

    for k, (ns, nt) in enumerate(LENGTHS):
        c = block(cost, k, source_mask, target_mask)
        exact = ot.emd2(torch.full((ns,), 1 / ns, dtype=torch.float64), torch.full((nt,), 1 / nt, dtype=torch.float64), c)
        assert res.cost[k].item() == pytest.approx(exact.item(), rel=EMD_RTOL)
    coarse = solve(cost, source_mask, target_mask, reg=0.1, n_iters=1000)
    assert torch.all((coarse.cost - res.cost).abs() > 10 * EMD_RTOL * res.cost), "reg=0.1 should be visibly far from OT"


# 4. Non-uniform marginal weights.


def test_weights_match_pot_and_marginals(domain):
    cost, source_mask, target_mask = padded_instance("cosine")
    g = torch.Generator().manual_seed(7)
    # Weights on padded positions are arbitrary (here large): they must be ignored.
    source_weights = torch.rand(BATCH, N, generator=g, dtype=torch.float64) + 0.1
    target_weights = torch.rand(BATCH, M, generator=g, dtype=torch.float64) + 0.1
    source_weights[~source_mask] = 100.0
    target_weights[~target_mask] = 100.0
    reg = 0.1
    res = solve(
        cost, source_mask, target_mask, reg=reg, source_weights=source_weights, target_weights=target_weights,
        n_iters=1000,
    )

    a = source_weights * source_mask
    a = a / a.sum(dim=1, keepdim=True)
    b = target_weights * target_mask
    b = b / b.sum(dim=1, keepdim=True)
    torch.testing.assert_close(uniform_weights(source_mask, source_weights, torch.float64), a)
    torch.testing.assert_close(res.plan.sum(dim=2), a, atol=MARGINAL_ATOL_F64, rtol=0)
    torch.testing.assert_close(res.plan.sum(dim=1), b, atol=MARGINAL_ATOL_F64, rtol=0)
    assert_padding_is_zero(res.plan, source_mask, target_mask)
    for k in range(BATCH):
        c = block(cost, k, source_mask, target_mask)
        expected = ot.bregman.sinkhorn_log(
            a[k][source_mask[k]], b[k][target_mask[k]], c, reg, numItermax=10_000, stopThr=1e-13
        )
        torch.testing.assert_close(block(res.plan, k, source_mask, target_mask), expected, atol=PLAN_ATOL_F64, rtol=0)
        torch.testing.assert_close(res.cost[k], (expected * c).sum(), atol=COST_ATOL_F64, rtol=0)


def test_uniform_marginals_without_weights():
    cost, source_mask, target_mask = padded_instance("uniform")
    res = solve(cost, source_mask, target_mask, reg=0.05, n_iters=1000)
    a = source_mask / source_mask.sum(dim=1, keepdim=True).to(torch.float64)
    b = target_mask / target_mask.sum(dim=1, keepdim=True).to(torch.float64)
    torch.testing.assert_close(res.plan.sum(dim=2), a, atol=MARGINAL_ATOL_F64, rtol=0)
    torch.testing.assert_close(res.plan.sum(dim=1), b, atol=MARGINAL_ATOL_F64, rtol=0)


# 5. Gradients.


def test_gradcheck_autodiff_with_padding(domain):
    lengths = ((3, 4), (2, 3))
    cost = make_cost("cosine", batch=2, n=3, m=4).requires_grad_(True)
    source_mask, target_mask = random_masks(lengths, 3, 4, torch.Generator().manual_seed(3))

    def plan_and_cost(c):
        res = solve(c, source_mask, target_mask, reg=0.3, n_iters=15, grad="autodiff")
        return res.plan, res.cost

    assert torch.autograd.gradcheck(plan_and_cost, (cost,), eps=1e-6, atol=1e-5, rtol=1e-4)


def regularised_objective(plan: torch.Tensor, cost: torch.Tensor, reg: float) -> torch.Tensor:
    """``<P, C> + reg * sum P log P`` per pair (0 log 0 = 0), i.e. ``<P, C> - reg * H(P)``."""
    return (plan * cost).sum(dim=(1, 2)) + reg * torch.special.xlogy(plan, plan).sum(dim=(1, 2))


def test_envelope_gradient_is_the_plan_and_the_gradient_of_the_regularised_objective(domain):
    cost, source_mask, target_mask = padded_instance("cosine")
    reg, n_iters = 0.1, 1000
    cost.requires_grad_(True)
    res = solve(cost, source_mask, target_mask, reg=reg, n_iters=n_iters)

    # No graph through the iterations: the plan is a constant (no grad_fn); only <P, C> is differentiable.
    assert not res.plan.requires_grad and res.plan.grad_fn is None
    assert res.cost.requires_grad
    (grad,) = torch.autograd.grad(res.cost.sum(), cost)
    assert torch.equal(grad, res.plan), "envelope gradient of sum(<P, C>) must be exactly the detached plan"

    # Envelope theorem: d/dC [<P*, C> - reg H(P*)] = P*. Central finite difference of the regularised optimum along a
    # random direction D restricted to real pairs, versus <P*, D>.
    pair_mask = source_mask[:, :, None] & target_mask[:, None, :]
    direction = torch.randn(cost.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * pair_mask
    step = 1e-5
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            shifted = cost + sign * step * direction
            plan = solve(shifted, source_mask, target_mask, reg=reg, n_iters=n_iters).plan
            values.append(regularised_objective(plan, shifted, reg))
        finite_difference = (values[0] - values[1]) / (2 * step)
    torch.testing.assert_close(finite_difference, (res.plan * direction).sum(dim=(1, 2)), atol=1e-7, rtol=1e-6)

    # The same value from POT's batched solver (its `value` is the regularised objective).
    pot = ot.solve_batch(
        M=cost.detach().masked_fill(~pair_mask, 0.0), reg=reg, a=uniform_weights(source_mask, dtype=torch.float64),
        b=uniform_weights(target_mask, dtype=torch.float64), max_iter=n_iters, tol=0.0, method="log_sinkhorn",
    )
    torch.testing.assert_close(regularised_objective(res.plan, cost.detach(), reg), pot.value, atol=1e-8, rtol=0)

    # And autodiff through the converged iterations of the regularised objective gives the plan as well.
    autodiff = solve(cost, source_mask, target_mask, reg=reg, n_iters=300, grad="autodiff")
    assert autodiff.plan.requires_grad
    (grad_reg,) = torch.autograd.grad(regularised_objective(autodiff.plan, cost, reg).sum(), cost)
    torch.testing.assert_close(grad_reg, res.plan, atol=1e-7, rtol=0)


def test_no_graph_without_grad_enabled():
    cost, source_mask, target_mask = padded_instance("cosine")
    cost.requires_grad_(True)
    with torch.no_grad():
        res = solve(cost, source_mask, target_mask, grad="autodiff")
    assert not res.plan.requires_grad and not res.cost.requires_grad


# 6. Stability.


@pytest.mark.parametrize("grad_mode", ["envelope", "autodiff"])
@pytest.mark.parametrize("reg", [1e-3, 1e-2, 0.1])
def test_finite_for_small_reg_on_cosine_costs(reg, grad_mode):
    batch, n, m = 3, 32, 48
    cost = cosine_cost(batch, n, m, dim=32, seed=11, dtype=torch.float32).requires_grad_(True)
    source_mask, target_mask = random_masks(((32, 48), (20, 48), (9, 13)), n, m, torch.Generator().manual_seed(12))
    res = solve(cost, source_mask, target_mask, reg=reg, n_iters=50, grad=grad_mode)
    (grad,) = torch.autograd.grad(res.cost.sum(), cost)

    assert res.plan.dtype == res.cost.dtype == torch.float32
    assert_finite(res.plan, res.cost, grad)
    assert_padding_is_zero(res.plan, source_mask, target_mask)
    # After the last (column) update the column marginals are exact up to float32 rounding.
    torch.testing.assert_close(res.plan.sum(dim=1), uniform_weights(target_mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad_mode", ["envelope", "autodiff"])
@pytest.mark.parametrize("real_tokens", [(1, 1), (1, 6), (5, 1)], ids=["one-each", "one-source", "one-target"])
def test_all_but_one_token_padding(real_tokens, grad_mode):
    n, m = 5, 6
    cost = make_cost("cosine", batch=2, n=n, m=m, seed=4, dtype=torch.float32).requires_grad_(True)
    source_mask, target_mask = random_masks((real_tokens, (n, m)), n, m, torch.Generator().manual_seed(2))
    res = solve(cost, source_mask, target_mask, reg=1e-3, n_iters=50, grad=grad_mode)
    (grad,) = torch.autograd.grad(res.cost.sum(), cost)

    assert_finite(res.plan, res.cost, grad)
    assert_padding_is_zero(res.plan, source_mask, target_mask)
    # With a single real token on a side, the plan is forced: that row (column) carries the other side's weights.
    # float32 rounding of log-kernel entries as large as max(C) / reg = 2e3 is 2e3 * 2**-23 = 2.4e-4 relative.
    ns, nt = real_tokens
    expected = torch.zeros(n, m)
    expected[source_mask[0, :, None] & target_mask[0, None, :]] = 1 / (ns * nt)
    torch.testing.assert_close(res.plan[0], expected, atol=1e-7, rtol=2.5e-4)
    torch.testing.assert_close(res.cost[0], (expected * cost[0].detach()).sum(), atol=1e-7, rtol=2.5e-4)


# POT's reference (pot_solve) offers grad="envelope" only.
SOLVER_MODES = [("torch", "envelope"), ("torch", "autodiff"), ("pot", "envelope")]


@pytest.mark.parametrize("empty_side", ["source", "target", "both"])
@pytest.mark.parametrize("backend, grad_mode", SOLVER_MODES)
def test_pair_without_real_tokens_is_zero_and_isolated(domain, empty_side, backend, grad_mode):
    cost, source_mask, target_mask = padded_instance("cosine", dtype=torch.float32)
    empty = 1
    if empty_side in ("source", "both"):
        source_mask[empty] = False
    if empty_side in ("target", "both"):
        target_mask[empty] = False
    cost.requires_grad_(True)
    kwargs = dict(reg=0.05, n_iters=200, grad=grad_mode, backend=backend)
    res = solve(cost, source_mask, target_mask, **kwargs)
    (grad,) = torch.autograd.grad(res.cost.sum(), cost)

    assert_finite(res.plan, res.cost, grad)
    assert torch.all(res.plan[empty] == 0) and res.cost[empty].item() == 0.0
    assert torch.all(grad[empty] == 0)
    others = [k for k in range(BATCH) if k != empty]
    alone = solve(cost.detach()[others], source_mask[others], target_mask[others], **kwargs)
    torch.testing.assert_close(res.plan[others], alone.plan, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.cost[others], alone.cost, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cost_is_solved_in_float32(domain, dtype):
    cost, source_mask, target_mask = padded_instance("cosine", dtype=torch.float32)
    reg = 0.1
    res = solve(cost.to(dtype), source_mask, target_mask, reg=reg, n_iters=200)

    assert res.plan.dtype == res.cost.dtype == torch.float32
    assert_finite(res.plan, res.cost)
    # Exactly the float32 solve of the rounded costs ...
    rounded = solve(cost.to(dtype).float(), source_mask, target_mask, reg=reg, n_iters=200)
    assert torch.equal(res.plan, rounded.plan) and torch.equal(res.cost, rounded.cost)
    # ... and close to the float32 solve of the original costs.
    reference = solve(cost, source_mask, target_mask, reg=reg, n_iters=200)
    torch.testing.assert_close(res.cost, reference.cost, atol=LOW_PRECISION_COST_ATOL[dtype], rtol=0)
    torch.testing.assert_close(res.plan, reference.plan, atol=LOW_PRECISION_PLAN_ATOL[dtype], rtol=0)

    grad_input = cost.to(dtype).requires_grad_(True)
    (grad,) = torch.autograd.grad(solve(grad_input, source_mask, target_mask, reg=reg).cost.sum(), grad_input)
    assert grad.dtype == dtype
    assert_finite(grad)


@pytest.mark.parametrize("grad_mode", ["envelope", "autodiff"])
def test_under_bfloat16_autocast(grad_mode):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 10, 16, generator=g).requires_grad_(True)
    y = torch.randn(3, 12, 16, generator=g)
    source_mask, target_mask = random_masks(((10, 12), (4, 7), (1, 12)), 10, 12, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_n = torch.nn.functional.normalize(x, dim=-1)
        y_n = torch.nn.functional.normalize(y, dim=-1)
        cost = 1 - torch.bmm(x_n, y_n.transpose(1, 2))
        assert cost.dtype == torch.bfloat16, "autocast must actually produce bf16 costs for this test to mean anything"
        res = solve(cost, source_mask, target_mask, reg=0.01, grad=grad_mode)
    (grad,) = torch.autograd.grad(res.cost.mean(), x)

    assert res.plan.dtype == res.cost.dtype == torch.float32
    assert_finite(res.plan, res.cost, grad)
    assert_padding_is_zero(res.plan, source_mask, target_mask)


@pytest.mark.parametrize("backend, grad_mode", SOLVER_MODES)
def test_nan_in_padded_costs_does_not_leak(domain, backend, grad_mode):
    cost, source_mask, target_mask = padded_instance("uniform", dtype=torch.float32)
    pair_mask = source_mask[:, :, None] & target_mask[:, None, :]
    poisoned = cost.masked_fill(~pair_mask, float("nan")).requires_grad_(True)
    kwargs = dict(reg=0.05, n_iters=100, grad=grad_mode, backend=backend)
    res = solve(poisoned, source_mask, target_mask, **kwargs)
    (grad,) = torch.autograd.grad(res.cost.sum(), poisoned)

    assert_finite(res.plan, res.cost, grad)
    assert torch.all(grad[~pair_mask] == 0)
    clean = solve(cost, source_mask, target_mask, **kwargs)
    assert torch.equal(res.plan, clean.plan) and torch.equal(res.cost, clean.cost)


# 7. Early stopping and input validation.


def test_tol_stops_early_and_matches_full_run(domain):
    cost, source_mask, target_mask = padded_instance("cosine", dtype=torch.float32)
    full = solve(cost, source_mask, target_mask, reg=0.05, n_iters=2000)
    kwargs = dict(reg=0.05, n_iters=2000, tol=1e-6, check_every=10)
    early = solve(cost, source_mask, target_mask, **kwargs)

    assert 0 < early.n_iters < 2000, f"expected an early stop, ran {early.n_iters} iterations"
    assert early.n_iters % 10 == 0, "stops only at a check (every `check_every` iterations)"
    assert_reports_iterations_run(early, cost, source_mask, target_mask, **kwargs)
    torch.testing.assert_close(early.plan, full.plan, atol=1e-6, rtol=0)
    torch.testing.assert_close(early.cost, full.cost, atol=1e-6, rtol=0)
    torch.testing.assert_close(early.plan.sum(dim=2), uniform_weights(source_mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("empty_side", ["source", "target"])
def test_tol_stops_early_with_an_empty_pair_in_the_batch(domain, empty_side):
    """A pair with no real token on one side has nothing to converge; it must not keep the batch iterating."""
    cost, source_mask, target_mask = padded_instance("cosine", dtype=torch.float32)
    kwargs = dict(reg=0.05, n_iters=2000, tol=1e-6, check_every=10)
    iterations_without = solve(cost, source_mask, target_mask, **kwargs).n_iters
    (source_mask if empty_side == "source" else target_mask)[1] = False
    res = solve(cost, source_mask, target_mask, **kwargs)

    assert res.n_iters == iterations_without < 2000
    assert_reports_iterations_run(res, cost, source_mask, target_mask, **kwargs)
    assert torch.all(res.plan[1] == 0) and res.cost[1].item() == 0.0


def test_check_every_does_not_change_a_full_run():
    cost, source_mask, target_mask = padded_instance("uniform")
    base = solve(cost, source_mask, target_mask, reg=0.1, n_iters=60)
    # tol=0 never triggers: the checks read the state but must not alter the iteration.
    checked = solve(cost, source_mask, target_mask, reg=0.1, n_iters=60, tol=0.0, check_every=7)
    assert torch.equal(base.plan, checked.plan)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reg=0.0), r"SinkhornOptions.reg must be a finite number > 0, got 0.0"),
        (dict(reg=-0.1), r"SinkhornOptions.reg must be a finite number > 0, got -0.1"),
        (dict(reg=float("nan")), r"SinkhornOptions.reg must be a finite number > 0, got nan"),
        (dict(reg=float("inf")), r"SinkhornOptions.reg must be a finite number > 0, got inf"),
        (dict(n_iters=0), r"SinkhornOptions.n_iters must be an integer >= 1, got 0"),
        (dict(check_every=0), r"SinkhornOptions.check_every must be an integer >= 1, got 0"),
        (dict(tol=float("nan")), r"SinkhornOptions.tol must be a finite number >= 0, got nan"),
        (dict(source_mask=torch.ones(2, 4, dtype=torch.bool)), r"masks must have shapes \(2, 3\) and \(2, 5\)"),
        (dict(target_mask=torch.ones(2, 3, dtype=torch.bool)), r"got \(2, 3\) and \(2, 3\)"),
        (dict(grad="implicit"), r"SinkhornOptions.grad must be one of \('envelope', 'autodiff'\), got 'implicit'"),
    ],
    ids=["reg-zero", "reg-negative", "reg-nan", "reg-inf", "n_iters-zero", "check_every-zero", "tol-nan",
         "source-mask-shape", "target-mask-shape", "grad"],
)
def test_invalid_arguments_raise(kwargs, match):
    cost = torch.rand(2, 3, 5)
    with pytest.raises(ValueError, match=match):
        solve(cost, **kwargs)


def test_two_dimensional_cost_raises():
    with pytest.raises(ValueError, match=r"`cost` must have shape \(batch, n, m\), got \(3, 5\)"):
        solve(torch.rand(3, 5))


def test_domain_follows_the_kernel_span():
    """The span of the log kernel, (max C - min C) / eps over the real pairs, picks the domain: scaling up to 29.6 in
    fp32 and 236 in fp64, log above."""
    cost, source_mask, target_mask = padded_instance("cosine", dtype=torch.float32)
    span = (cost.amax() - cost.amin()).item()  # at least the span over the real pairs, and not far above it
    runs = [(cost, span / 10), (cost, span / 1000), (cost, span / 100), (cost.double(), span / 100)]
    domains = [solve(c, source_mask, target_mask, reg=reg, n_iters=5).domain for c, reg in runs]
    assert domains == ["scaling", "log", "log", "scaling"]


def test_scaling_domain_would_overflow_where_the_span_rule_refuses_it(monkeypatch):
    """Why the rule exists: at eps = 1e-3 on costs in [0, 2] in fp32 the kernel underflows and the scalings blow up."""
    cost, source_mask, target_mask = padded_instance("cosine", dtype=torch.float32)
    chosen = solve(cost, source_mask, target_mask, reg=1e-3, n_iters=3000)
    monkeypatch.setattr(f"{__name__}.DOMAIN", "scaling")
    forced = solve(cost, source_mask, target_mask, reg=1e-3, n_iters=3000)
    assert chosen.marginal_error.max() < ot_module.UNCONVERGED_L1
    assert forced.marginal_error.max() > 1.0


# 8. Batch invariance.


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("grad_mode", ["envelope", "autodiff"])
def test_padded_batch_equals_each_pair_alone(domain, dtype, atol, grad_mode):
    cost, source_mask, target_mask = padded_instance("cosine", dtype=dtype)
    # Few iterations, far from convergence: padding must not change the iterates themselves.
    res = solve(cost, source_mask, target_mask, reg=0.05, n_iters=20, grad=grad_mode)
    for k in range(BATCH):
        c = block(cost, k, source_mask, target_mask)[None]
        alone = solve(c, reg=0.05, n_iters=20, grad=grad_mode)
        torch.testing.assert_close(block(res.plan, k, source_mask, target_mask), alone.plan[0], atol=atol, rtol=0)
        torch.testing.assert_close(res.cost[k], alone.cost[0], atol=atol, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_cost_between_real_tokens_raises(bad):
    cost, source_mask, target_mask = padded_instance("uniform")
    k = 2
    i, j = source_mask[k].nonzero()[0].item(), target_mask[k].nonzero()[0].item()
    cost[k, i, j] = bad
    with pytest.raises(NonFiniteLossError, match=r"NaN or inf entries between real tokens in pair\(s\) \[2\]"):
        solve(cost, source_mask, target_mask)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x[1, 0, 0] = bad
    with pytest.raises(NonFiniteLossError, match=r"pair\(s\) \[1\]"):
        divergence(x, None, torch.randn(2, 5, 4, dtype=torch.float64), None, reg=0.1)


# 9. Convergence diagnostics.


def test_result_reports_iterations_and_marginal_error(domain):
    cost, source_mask, target_mask = padded_instance("cosine")
    a = uniform_weights(source_mask, dtype=torch.float64)
    few = solve(cost, source_mask, target_mask, reg=0.01, n_iters=3)
    assert few.n_iters == 3
    torch.testing.assert_close(few.marginal_error, (few.plan.sum(dim=2) - a).abs().sum(dim=1), atol=1e-12, rtol=0)
    assert few.marginal_error.max() > ot_module.UNCONVERGED_L1, "3 iterations at reg 0.01 must not converge"
    kwargs = dict(reg=0.1, n_iters=5000, tol=1e-10, check_every=10)
    early = solve(cost, source_mask, target_mask, **kwargs)
    assert early.n_iters < 5000 and early.n_iters % 10 == 0
    assert_reports_iterations_run(early, cost, source_mask, target_mask, **kwargs)
    assert early.marginal_error.max() < 1e-10
    assert few.reg.shape == (BATCH,) and torch.all(few.reg == 0.01)


def test_unconverged_warning_fires_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(ot_module, "_warned_unconverged", False)
    cost, source_mask, target_mask = padded_instance("cosine")
    with caplog.at_level(logging.WARNING, logger="optical_hf.ot"):
        solve(cost, source_mask, target_mask, reg=1.0, n_iters=500)  # converged: no warning
        assert not caplog.records
        for _ in range(2):
            solve(cost, source_mask, target_mask, reg=0.01, n_iters=3)
        divergence(torch.randn(2, 9, 4), None, torch.randn(2, 7, 4), None, reg=1e-3, n_iters=2)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "after 3 iterations at reg=eps=0.01" in message and "Raise n_iters" in message


# 10. Relative reg and the regularised value.


def test_relative_reg_scales_with_the_cost():
    cost, source_mask, target_mask = padded_instance("cosine")
    a = uniform_weights(source_mask, dtype=torch.float64)
    b = uniform_weights(target_mask, dtype=torch.float64)
    res = solve(cost, source_mask, target_mask, reg=0.1, relative_reg=True, n_iters=500)
    masked = cost.masked_fill(~(source_mask[:, :, None] & target_mask[:, None, :]), 0)
    torch.testing.assert_close(res.reg, 0.1 * torch.einsum("bn,bnm,bm->b", a, masked, b))
    scaled = solve(1000 * cost, source_mask, target_mask, reg=0.1, relative_reg=True, n_iters=500)
    torch.testing.assert_close(scaled.plan, res.plan, atol=1e-10, rtol=0)


def test_value_is_the_regularised_objective_with_the_plan_as_gradient():
    cost, source_mask, target_mask = padded_instance("cosine")
    reg = 0.1
    cost.requires_grad_(True)
    res = solve(cost, source_mask, target_mask, reg=reg, n_iters=1000)
    # KL(P | a (x) b) = sum P log P + H(a) + H(b) for a plan with marginals a, b; uniform a, b: H = log(length).
    entropies = source_mask.sum(1).double().log() + target_mask.sum(1).double().log()
    expected = regularised_objective(res.plan, cost.detach(), reg) + reg * entropies
    torch.testing.assert_close(res.value.detach(), expected, atol=1e-10, rtol=0)
    (grad,) = torch.autograd.grad(res.value.sum(), cost)
    assert torch.equal(grad, res.plan)


# 11. Pairwise costs.


def test_pairwise_cost():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(pairwise_cost(x, y, "sqeuclidean"), torch.cdist(x, y) ** 2)
    torch.testing.assert_close(pairwise_cost(x, y, "cosine"), 1 - cosine_similarity(x[:, :, None], y[:, None], dim=-1))
    assert pairwise_cost(x.half(), y.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="`cost` must be 'cosine' or 'sqeuclidean', got 'l1'"):
        pairwise_cost(x, y, "l1")


# 12. The Sinkhorn divergence.


def token_clouds(seed=0, dtype=torch.float64, dim=6):
    """Random ``(BATCH, N, dim)`` / ``(BATCH, M, dim)`` clouds with padding and random positive weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, N, dim, generator=g, dtype=dtype)
    y = torch.randn(BATCH, M, dim, generator=g, dtype=dtype) + 0.5
    x_mask, y_mask = random_masks(LENGTHS, N, M, g)
    x_weights = torch.rand(BATCH, N, generator=g, dtype=dtype) + 0.1
    y_weights = torch.rand(BATCH, M, generator=g, dtype=dtype) + 0.1
    return x, x_mask, x_weights, y, y_mask, y_weights


def weighted_means(x, mask, weights):
    return torch.einsum("bn,bnd->bd", uniform_weights(mask, weights, x.dtype), x)


def test_divergence_large_reg_is_the_squared_distance_of_the_means(domain):
    x, x_mask, x_w, y, y_mask, y_w = token_clouds()
    value = divergence(x, x_mask, y, y_mask, reg=1e5, x_weights=x_w, y_weights=y_w, n_iters=20)
    expected = (weighted_means(x, x_mask, x_w) - weighted_means(y, y_mask, y_w)).pow(2).sum(dim=1)
    torch.testing.assert_close(value, expected, rtol=1e-3, atol=0)


def test_small_reg_matches_exact_sqeuclidean_ot():
    x, x_mask, _, y, y_mask, _ = token_clouds(seed=1)
    cost = pairwise_cost(x, y, "sqeuclidean")
    res = solve(cost, x_mask, y_mask, reg=1e-3, relative_reg=True, n_iters=5000, tol=1e-9, check_every=50)
    for k, (ns, nt) in enumerate(LENGTHS):
        a, b = torch.full((ns,), 1 / ns, dtype=torch.float64), torch.full((nt,), 1 / nt, dtype=torch.float64)
        exact = ot.emd2(a, b, ot.dist(x[k][x_mask[k]], y[k][y_mask[k]]))
        assert res.cost[k].item() == pytest.approx(exact.item(), rel=EMD_RTOL)


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize("reg", [0.01, 0.1, 1.0])
def test_divergence_is_nonnegative_and_zero_on_identical_inputs(domain, cost, reg):
    x, x_mask, x_w, y, y_mask, y_w = token_clouds(seed=2)
    kwargs = dict(reg=reg, cost=cost, n_iters=3000, tol=1e-12)
    result = divergence_result(x, x_mask, y, y_mask, x_weights=x_w, y_weights=y_w, **kwargs)
    assert torch.all(result.divergence > 0)
    assert result.marginal_error.max() < 1e-12 and 0 < result.n_iters < 3000
    same = divergence_result(x, x_mask, x, x_mask, x_weights=x_w, y_weights=x_w, **kwargs)
    # OT(a, a) solved as a cross problem (alternating updates) converges slowly to 1e-12 (it oscillates; 2e-5 left
    # after 3000 iterations here, far below the 1e-2 warning threshold): S(a, a) is 0 up to that.
    assert same.marginal_error.max() < 1e-4
    torch.testing.assert_close(same.divergence, torch.zeros(BATCH, dtype=torch.float64), atol=1e-5, rtol=0)


def test_sqeuclidean_ot_with_weights_bounds_the_squared_distance_of_the_means():
    """Jensen: sum P_ij |x_i - y_j|^2 >= |sum P_ij (x_i - y_j)|^2 = |mean_a x - mean_b y|^2 for any coupling."""
    for seed in range(3):
        x, x_mask, x_w, y, y_mask, y_w = token_clouds(seed=seed)
        expected = (weighted_means(x, x_mask, x_w) - weighted_means(y, y_mask, y_w)).pow(2).sum(dim=1)
        for reg in (0.05, 1.0, 1e3):
            res = solve(pairwise_cost(x, y, "sqeuclidean"), x_mask, y_mask, reg=reg, relative_reg=True,
                           source_weights=x_w, target_weights=y_w, n_iters=2000)
            assert res.marginal_error.max() < 1e-9
            assert torch.all(res.cost >= expected)


@pytest.mark.parametrize("grad_mode", ["envelope", "autodiff"])
def test_divergence_padded_batch_equals_each_pair_alone(domain, grad_mode):
    x, x_mask, x_w, y, y_mask, y_w = token_clouds(seed=3)
    x_nan = x.masked_fill(~x_mask[..., None], float("nan"))  # padding may hold anything
    kwargs = dict(reg=0.05, n_iters=20, grad=grad_mode)
    padded = divergence(x_nan, x_mask, y, y_mask, x_weights=x_w, y_weights=y_w, **kwargs)
    assert torch.isfinite(padded).all()
    for k in range(BATCH):
        alone = divergence(
            x[k][x_mask[k]][None], None, y[k][y_mask[k]][None], None, x_weights=x_w[k][x_mask[k]][None],
            y_weights=y_w[k][y_mask[k]][None], **kwargs,
        )
        torch.testing.assert_close(padded[k], alone[0], atol=1e-12, rtol=0)


def test_divergence_gradient_and_empty_pairs(domain):
    x, x_mask, _, y, y_mask, _ = token_clouds(seed=4)
    x_mask[1] = False
    x.requires_grad_(True)
    value = divergence(x, x_mask, y, y_mask, reg=0.1, n_iters=300)
    assert value[1].item() == 0.0
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.isfinite(grad).all() and torch.all(grad[1] == 0) and grad[0].abs().sum() > 0
    # moving x towards y along the gradient lowers the divergence
    with torch.no_grad():
        lower = divergence(x - 0.01 * grad, x_mask, y, y_mask, reg=0.1, n_iters=300)
    assert torch.all(lower[[0, 2, 3]] < value.detach()[[0, 2, 3]])


# 13. Semi-relaxed OT (exact source marginal, KL-relaxed target marginal).


def weighted_instance(seed=0):
    """A padded cosine instance with random positive weights (arbitrary on padding)."""
    cost, source_mask, target_mask = padded_instance("cosine", seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    source_weights = torch.rand(BATCH, N, generator=g, dtype=torch.float64) + 0.1
    target_weights = torch.rand(BATCH, M, generator=g, dtype=torch.float64) + 0.1
    return cost, source_mask, target_mask, source_weights, target_weights


@pytest.mark.parametrize("rho", [0.02, 0.3, 3.0])
def test_semi_relaxed_matches_pot_unbalanced_per_pair(domain, rho):
    cost, source_mask, target_mask, source_weights, target_weights = weighted_instance()
    reg = 0.05
    res = solve(cost, source_mask, target_mask, reg=reg, rho=rho, source_weights=source_weights,
                   target_weights=target_weights, n_iters=3000)

    a = uniform_weights(source_mask, source_weights, torch.float64)
    b = uniform_weights(target_mask, target_weights, torch.float64)
    assert_padding_is_zero(res.plan, source_mask, target_mask)
    torch.testing.assert_close(res.plan.sum(dim=2), a, atol=MARGINAL_ATOL_F64, rtol=0)  # the exact side
    assert res.marginal_error.max() < MARGINAL_ATOL_F64 and res.n_iters == 3000
    assert (res.plan.sum(dim=1) - b).abs().sum(dim=1).min() > 1e-3, "the target marginal must be relaxed"
    for k in range(BATCH):
        c = block(cost, k, source_mask, target_mask)
        expected, log = ot.unbalanced.sinkhorn_unbalanced(
            a[k][source_mask[k]], b[k][target_mask[k]], c, reg, reg_m=(float("inf"), rho), numItermax=10_000,
            stopThr=1e-14, log=True,
        )
        torch.testing.assert_close(block(res.plan, k, source_mask, target_mask), expected, atol=PLAN_ATOL_F64, rtol=0)
        torch.testing.assert_close(res.value[k], log["total_cost"], atol=COST_ATOL_F64, rtol=0)


def test_semi_relaxed_limits_are_balanced_ot_and_the_row_softmax(domain):
    cost, source_mask, target_mask = padded_instance("cosine")
    source_mask[3] = False  # a pair with no source token: zero plan and value
    reg = 0.05
    balanced = solve(cost, source_mask, target_mask, reg=reg, n_iters=2000)
    large = solve(cost, source_mask, target_mask, reg=reg, rho=1e9, n_iters=2000)
    torch.testing.assert_close(large.plan, balanced.plan, atol=1e-8, rtol=0)

    small = solve(cost, source_mask, target_mask, reg=reg, rho=1e-10, n_iters=5)
    a = uniform_weights(source_mask, dtype=torch.float64)
    logits = (-cost / reg).masked_fill(~target_mask[:, None], float("-inf"))
    softmax = (a[:, :, None] * logits.softmax(dim=2)).masked_fill(~source_mask[:, :, None], 0.0)
    torch.testing.assert_close(small.plan, softmax, atol=1e-9, rtol=0)
    assert torch.all(small.plan[3] == 0) and small.value[3].item() == 0.0 and small.marginal_error[3].item() == 0.0


def test_semi_relaxed_envelope_gradient_and_relative_rho():
    cost, source_mask, target_mask, source_weights, target_weights = weighted_instance(seed=3)
    kwargs = dict(reg=0.1, rho=0.5, relative_reg=True, source_weights=source_weights, target_weights=target_weights,
                  n_iters=500)
    cost.requires_grad_(True)
    res = solve(cost, source_mask, target_mask, **kwargs)
    (grad,) = torch.autograd.grad(res.value.sum(), cost)
    assert torch.equal(grad, res.plan)

    # d value / d C = P: central finite difference of the optimal value along a random direction on the real pairs.
    pair_mask = source_mask[:, :, None] & target_mask[:, None, :]
    direction = torch.randn(cost.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * pair_mask
    step = 1e-5
    with torch.no_grad():
        # absolute reg and rho frozen at this instance's values, so that only the cost moves
        absolute = dict(kwargs, relative_reg=False)
        values = []
        for sign in (1, -1):
            per_pair = [
                solve((cost + sign * step * direction)[k:k + 1], source_mask[k:k + 1], target_mask[k:k + 1],
                         **dict(absolute, reg=res.reg[k].item(), rho=5 * res.reg[k].item(),
                                source_weights=source_weights[k:k + 1], target_weights=target_weights[k:k + 1])).value
                for k in range(BATCH)
            ]
            values.append(torch.cat(per_pair))
        finite_difference = (values[0] - values[1]) / (2 * step)
    torch.testing.assert_close(finite_difference, (res.plan * direction).sum(dim=(1, 2)), atol=1e-7, rtol=1e-6)

    # relative rho: rho_b = rho * eps_b / reg, so scaling the cost leaves the plan unchanged
    scaled = solve(100 * cost.detach(), source_mask, target_mask, **kwargs)
    torch.testing.assert_close(scaled.plan, res.plan, atol=1e-10, rtol=0)


def test_semi_relaxed_autodiff_matches_envelope_and_float32_is_stable():
    cost = cosine_cost(2, 12, 16, seed=4, dtype=torch.float32).requires_grad_(True)
    source_mask, target_mask = random_masks(((12, 16), (3, 5)), 12, 16, torch.Generator().manual_seed(2))
    envelope = solve(cost, source_mask, target_mask, reg=0.01, rho=0.1, relative_reg=True, n_iters=300)
    autodiff = solve(cost, source_mask, target_mask, reg=0.01, rho=0.1, relative_reg=True, n_iters=300,
                        grad="autodiff")
    (grad_envelope,) = torch.autograd.grad(envelope.value.sum(), cost)
    (grad_autodiff,) = torch.autograd.grad(autodiff.value.sum(), cost)
    assert_finite(envelope.plan, envelope.value, grad_autodiff)
    torch.testing.assert_close(autodiff.plan.detach(), envelope.plan, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_autodiff, grad_envelope, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=0.0), r"`rho` must be None or a finite number > 0, got 0.0"),
        (dict(rho=float("inf")), r"`rho` must be None or a finite number > 0, got inf"),
    ],
)
def test_semi_relaxed_invalid_rho_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve(torch.rand(2, 3, 5), **kwargs)


# 10. The options object: declared, checked and passed whole.


def test_options_are_one_frozen_object_with_the_shipped_objectives_defaults():
    from optical_hf import OTLossConfig

    options = SinkhornOptions()
    assert options == OTLossConfig().sinkhorn, "the solver's defaults are the shipped objective's"
    assert (options.reg, options.relative, options.domain) == (1.0, True, "auto")
    with pytest.raises(AttributeError):
        options.reg = 0.1  # frozen
    assert OTLossConfig(reg=0.1, tol=0).sinkhorn == SinkhornOptions(reg=0.1, tol=None)
    with pytest.raises(ValueError, match="SinkhornOptions.domain must be one of \\('auto', 'log', 'scaling'\\)"):
        SinkhornOptions(domain="exp")
    with pytest.raises(TypeError, match="`options` must be a SinkhornOptions, got dict"):
        sinkhorn(torch.rand(1, 2, 3), None, None, {"reg": 0.1})
    x, y = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    result = sinkhorn_divergence(x, None, y, None)
    assert isinstance(result, DivergenceResult) and result.divergence.shape == (2,)


@pytest.mark.parametrize("forced", ["log", "scaling"])
def test_the_domain_option_picks_where_the_iterations_run(forced):
    cost, source_mask, target_mask = padded_instance("cosine")
    auto = sinkhorn(cost, source_mask, target_mask, SinkhornOptions(reg=0.5, tol=None, n_iters=30))
    other = sinkhorn(cost, source_mask, target_mask, SinkhornOptions(reg=0.5, tol=None, n_iters=30, domain=forced))
    assert auto.domain == "scaling" and other.domain == forced
    torch.testing.assert_close(other.plan, auto.plan, atol=1e-12, rtol=0)  # the same iterates, up to rounding
