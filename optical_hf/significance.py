"""Paired significance of a difference between two retrieval systems evaluated on the same queries.

Given each system's per-query score (e.g. reciprocal rank from
:func:`optical_hf.evaluation.per_query_metrics`) on the same queries, :func:`paired_test` reports the mean difference,
a bootstrap confidence interval over queries and the two-sided p-value of a paired randomization (sign-flip) test:
under the null hypothesis the two systems are exchangeable on every query, so each query's difference is as likely
to have either sign. With several seeds per system, each query's differences are first averaged over the seeds that
both systems ran, so that the resampled unit stays the query. Both procedures are scipy's
(``scipy.stats.permutation_test`` with ``permutation_type="samples"``, ``scipy.stats.bootstrap`` percentile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["PairedTest", "paired_test"]


@dataclass(frozen=True)
class PairedTest:
    """Result of :func:`paired_test`: ``difference`` = mean of ``a - b`` over queries, its ``confidence``
    interval ``[low, high]``, the two-sided ``p_value`` and the number of queries ``n``."""

    difference: float
    low: float
    high: float
    p_value: float
    n: int
    confidence: float = 0.95

    def verdict(self, alpha: float = 0.05) -> str:
        """``"win"`` (a ahead with p < alpha), ``"loss"`` (b ahead with p < alpha) or ``"level"``."""
        if self.p_value >= alpha:
            return "level"
        return "win" if self.difference > 0 else "loss"


def paired_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 9999,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedTest:
    """Paired randomization test and bootstrap interval of ``mean(a - b)``.

    Args:
        a, b: per-query scores of the two systems, ``(n_queries,)``, or ``(n_seeds, n_queries)`` (seed ``k`` of
            ``a`` paired with seed ``k`` of ``b``; the differences are averaged over seeds per query first).
        n_resamples: random sign flips and bootstrap resamples.
        confidence: level of the percentile bootstrap interval.
        seed: seed of both resamplings (the result is deterministic).

    Returns:
        A :class:`PairedTest`.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2) or a.shape[-1] < 2:
        raise ValueError(f"paired_test: a and b must have the same shape (n_queries,) or (n_seeds, n_queries) with "
                         f"n_queries >= 2, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_test: the scores must be finite")
    differences = (a - b).reshape(-1, a.shape[-1]).mean(axis=0)
    if not differences.any():
        return PairedTest(0.0, 0.0, 0.0, 1.0, len(differences), confidence)
    flips = stats.permutation_test(
        (differences,), lambda d, axis: np.mean(d, axis=axis), permutation_type="samples", vectorized=True,
        n_resamples=n_resamples, rng=np.random.default_rng(seed),
    )
    interval = stats.bootstrap(
        (differences,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return PairedTest(float(differences.mean()), float(interval.low), float(interval.high), float(flips.pvalue),
                      len(differences), confidence)
