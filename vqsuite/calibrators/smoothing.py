"""SVDQuant smoothing factors: the (α, β) search grid and ``λ = max|X|^α / max|W|^β`` per input channel.

Smoothing divides the input by ``λ`` and multiplies the weight's columns by it (``Ŵ = W·diag(λ)``,
``X̂ = X·diag(λ)^-1``), moving activation outliers into the weight, where the 16-bit low-rank branch absorbs
them. This follows deepcompressor (``calib/smooth.py::get_smooth_scale``, ``calib/config/smooth.py``
``get_alpha_beta_pairs`` with ``alpha: 0.5, beta: -2``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from vqsuite.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

#: deepcompressor's ``num_grids`` for SVDQuant (``configs/svdquant/__default__.yaml``)
DEFAULT_NUM_GRIDS = 20
#: ``fast.yaml``: 10 grid points
FAST_NUM_GRIDS = 10


def smoothing_grid(num_grids: int = DEFAULT_NUM_GRIDS) -> list[tuple[float, float]]:
    """The candidate ``(α, β)`` pairs, in search order.

    ``{(0, 0)} ∪ {(i/n, 0)} ∪ {(i/n, 1 - i/n)}`` for ``i = 1 … n-1`` (deepcompressor's ``beta = -2`` grid):
    ``2n - 1`` candidates, 39 for ``n = 20``, 19 for the fast grid ``n = 10``.
    """
    if not isinstance(num_grids, int) or isinstance(num_grids, bool) or num_grids < 1:
        raise ConfigError(f"num_grids={num_grids!r} must be a positive integer")
    choices = [i / num_grids for i in range(1, num_grids)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in choices] + [(a, 1.0 - a) for a in choices]


def weight_column_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max_rows |W[:, k]|`` over every weight of a shared-input group: ``[K]`` float64.

    weights: ``[N_i, K]`` each (all with the same ``K``).
    """
    if not weights:
        raise ValueError("weights is empty")
    k = weights[0].shape[-1]
    for w in weights:
        if w.ndim != 2 or w.shape[-1] != k:
            raise ValueError(f"every weight must be [N, {k}], got {tuple(w.shape)}")
    return torch.stack([w.detach().abs().amax(dim=0).double().cpu() for w in weights]).amax(dim=0)


def smooth_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``λ_k = x_absmax_k^α / w_absmax_k^β``: ``[K]`` float64, positive and finite.

    x_absmax: ``[K]`` per-input-channel max |x| over calibration tokens; w_absmax: ``[K]`` per-column max |W|
    (over the rows of every weight sharing the input). ``(α, β) = (0, 0)`` gives ones. Sanitation as in
    deepcompressor: ``λ = 0`` becomes 1 (a dead channel); if anything is NaN or Inf (a dead weight column
    with ``β > 0`` divides by zero) every ``λ`` falls back to 1 — deepcompressor asserts instead, the spec says
    fall back, and a fallback keeps one bad channel from aborting a whole model.
    """
    if x_absmax.shape != w_absmax.shape or x_absmax.ndim != 1:
        raise ValueError(f"x_absmax {tuple(x_absmax.shape)} and w_absmax {tuple(w_absmax.shape)} must be equal [K]")
    if not (0.0 <= alpha <= 1.0 and 0.0 <= beta <= 1.0):
        raise UserError(f"alpha={alpha} and beta={beta} must lie in [0, 1]")
    xa = x_absmax.double()
    wa = w_absmax.double().to(xa.device)
    if alpha == 0 and beta == 0:
        return torch.ones_like(xa)
    # deepcompressor computes w^-β on its own when α = 0 (0^0 = 1 either way)
    lam = xa.pow(alpha) / wa.pow(beta) if alpha > 0 else wa.pow(-beta)
    lam = torch.where(lam == 0, torch.ones_like(lam), lam)
    if not bool(torch.isfinite(lam).all()):
        logger.debug("smoothing factors for (alpha=%s, beta=%s) hold NaN/Inf; using ones", alpha, beta)
        return torch.ones_like(xa)
    return lam
