"""SVDQuant's low-rank branch: a float64 (full or randomized) SVD and the iterative refinement loop.

Notation (one linear layer, or the row-concatenation of a group that shares its input):
``Ŵ [N, K]`` smoothed weight, ``X̂ [M, K]`` smoothed calibration rows, ``up [N, r] = U_r S_r`` (deepcompressor's
``lora_up``, ``L1``), ``down [K, r] = V_r`` (``lora_down`` transposed, ``L2^T``), residual ``R = Ŵ - up @ down^T``.
The layer computes ``Q_x(X̂) @ Q_w(R)^T + (X̂ @ down) @ up^T``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vqsuite.config import QuantSpec
from vqsuite.errors import ConfigError
from vqsuite.nn.quantizers import fake_quantize_weight, quantize_activation

logger = logging.getLogger(__name__)

SVD_METHODS: tuple[str, ...] = ("auto", "full", "randomized")
#: ``svd="auto"`` takes the randomized SVD when ``min(N, K)`` exceeds this. On 2 CPU cores a full float64 SVD
#: takes 0.05 s at 512x512, 0.5 s at 3072x1024 and ~7 s at 3072x3072; the randomized one 0.007 s, 0.05 s and
#: 0.2 s, with a residual norm within 0.5% of the optimum (tests/calibrators/test_calib_lowrank.py)
RANDOMIZED_MIN_DIM = 512
#: extra random directions beyond the rank (Halko et al. recommend 5-10; more is cheap at rank 32)
RANDOMIZED_OVERSAMPLE = 16
#: power (subspace) iterations; each re-orthonormalises, so float64 round-off stays harmless
RANDOMIZED_POWER_ITERS = 4
#: power iterations of a warm-started randomized SVD (``init=`` a nearby subspace): the refinement's
#: ``Ŵ - Q_prev`` moves little from one iteration to the next, and a smoothing candidate's subspace is close to
#: its grid neighbour's, so one pass recovers what four passes from a random start do
WARM_POWER_ITERS = 1
#: deepcompressor's ``num_iters`` for the refinement loop
DEFAULT_LOWRANK_ITERS = 100


def lowrank_svd(
    w: torch.Tensor,
    rank: int,
    method: str = "auto",
    *,
    seed: int = 0,
    init: torch.Tensor | None = None,
    power_iters: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (or, randomized, near-best) rank-``rank`` factors of ``w [N, K]`` in float64.

    Returns ``(up [N, r] = U_r·S_r, down [K, r] = V_r)`` on ``w``'s device, so ``w ≈ up @ down.T``.
    ``method``: ``"full"`` (``torch.linalg.svd``), ``"randomized"`` (a seeded Halko-Martinsson-Tropp range
    finder with :data:`RANDOMIZED_OVERSAMPLE` extra columns and :data:`RANDOMIZED_POWER_ITERS` re-orthonormalised
    power iterations, then an exact SVD of the small projected matrix) or ``"auto"`` (randomized when
    ``min(N, K) > RANDOMIZED_MIN_DIM``).

    Warm start (randomized only): ``init [K, c]`` (e.g. the ``down`` of a nearby matrix) replaces the first ``c``
    random columns of the range finder's test matrix, and ``power_iters`` (default :data:`WARM_POWER_ITERS` with
    ``init``, else :data:`RANDOMIZED_POWER_ITERS`) sets the number of power iterations.
    """
    if method not in SVD_METHODS:
        raise ConfigError(f"method={method!r} must be one of {', '.join(SVD_METHODS)}")
    if w.ndim != 2:
        raise ValueError(f"w must be [N, K], got {tuple(w.shape)}")
    n, k = w.shape
    if not 0 <= rank <= min(n, k):
        raise ConfigError(f"rank={rank} must lie in [0, min(N, K)={min(n, k)}]")
    a = w.detach().double()
    if rank == 0:
        return a.new_zeros(n, 0), a.new_zeros(k, 0)
    if method == "auto":
        method = "randomized" if min(n, k) > RANDOMIZED_MIN_DIM else "full"
    width = rank + RANDOMIZED_OVERSAMPLE
    if method == "full" or width >= min(n, k):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank].t()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(k, width, generator=gen, dtype=torch.float64).to(a.device)
    if init is not None:
        if init.ndim != 2 or init.shape[0] != k:
            raise ValueError(f"init must be [K={k}, c], got {tuple(init.shape)}")
        c = min(init.shape[1], width)
        omega[:, :c] = init[:, :c].to(omega)
    if power_iters is None:
        power_iters = RANDOMIZED_POWER_ITERS if init is None else WARM_POWER_ITERS
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.t() @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, s, vh = torch.linalg.svd(q.t() @ a, full_matrices=False)  # [width, K], small
    u = q @ ub[:, :rank]
    return u * s[:rank], vh[:rank].t()


def quantize_weight_rows(w: torch.Tensor, spec: QuantSpec, splits: Sequence[int] | None = None) -> torch.Tensor:
    """Fake-quantize ``w [N, K]`` as ``spec`` says, each slice of ``splits`` rows on its own: ``[N, K]`` float32.

    A shared-input group is quantized layer by layer (each layer stores its own residual, and NVFP4's tensor
    scale is per layer), so the calibration sees exactly what the layers will compute.
    """
    wf = w.detach().float()
    if spec.weight is None:
        return wf
    splits = [wf.shape[0]] if splits is None else list(splits)
    if sum(splits) != wf.shape[0]:
        raise ValueError(f"splits={splits} do not add up to the {wf.shape[0]} rows of w")
    return torch.cat([fake_quantize_weight(part, spec) for part in torch.split(wf, splits, dim=0)], dim=0)


def quantize_input_rows(x_hat: torch.Tensor, spec: QuantSpec, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``Q_x(X̂)``: the activation fake-quantizer of ``spec`` on ``x_hat [M, K]`` (identity without one)."""
    if spec.act is None:
        return x_hat.float()
    return quantize_activation(x_hat.float(), spec, act_scale, name="calibration input")


def output_error(
    y: torch.Tensor,
    xq: torch.Tensor,
    x_hat: torch.Tensor,
    wq: torch.Tensor,
    up: torch.Tensor | None = None,
    down: torch.Tensor | None = None,
) -> float:
    """``||Y - (Q_x(X̂) @ Q_w(R)^T + (X̂ @ down) @ up^T)||²_F`` (a float).

    y: ``[M, N]`` float reference output; xq, x_hat: ``[M, K]``; wq: ``[N, K]`` quantized residual;
    up ``[N, r]``, down ``[K, r]``. GEMMs run in float32 (the error they add is orders below a 4-bit one),
    the sum in float64.
    """
    y_hat = xq.float() @ wq.float().t()
    if up is not None and down is not None and up.shape[-1] > 0:
        y_hat = y_hat + (x_hat.float() @ down.float()) @ up.float().t()
    return float((y.float() - y_hat).double().pow(2).sum())


def gram_output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X̂ Δ^T||²_F = tr(Δ G Δ^T)`` from the Gram matrix ``G = X̂^T X̂`` without touching the rows of ``X̂``.

    delta: ``[N, K]`` weight error (``Ŵ - up @ down^T - Q_w(R)`` when the input is not quantized, so the output
    error is ``X̂ Δ^T``); gram: ``[K, K]``. Float64. Cheaper than :func:`output_error` when the rows ``M`` exceed
    ``K`` (``N·K²`` instead of ``M·K·N`` multiply-adds); only valid for layers whose activations stay unquantized.
    """
    d = delta.double()
    return float(((d @ gram.double()) * d).sum())


@dataclass
class LowRankResult:
    """What :func:`refine_lowrank` found.

    Attributes:
        up: ``[N, r]`` float64; down: ``[K, r]`` float64 (``Ŵ ≈ up @ down^T + residual``).
        residual: ``[N, K]`` float64, ``Ŵ - up @ down^T`` (the part the layer quantizes).
        wq: ``[N, K]`` float32, the fake-quantized residual of the best iteration.
        error: the best output error; errors: the error of every iteration run, in order.
        iterations: how many iterations ran (``len(errors)``); best_iteration: index of the kept one.
    """

    up: torch.Tensor
    down: torch.Tensor
    residual: torch.Tensor
    wq: torch.Tensor
    error: float
    errors: list[float] = field(default_factory=list)
    best_iteration: int = 0

    @property
    def iterations(self) -> int:
        return len(self.errors)


@torch.no_grad()
def refine_lowrank(
    w_hat: torch.Tensor,
    x_hat: torch.Tensor,
    spec: QuantSpec,
    rank: int,
    *,
    y: torch.Tensor | None = None,
    xq: torch.Tensor | None = None,
    splits: Sequence[int] | None = None,
    num_iters: int = DEFAULT_LOWRANK_ITERS,
    early_stop: bool = True,
    svd: str = "auto",
    act_scale: torch.Tensor | None = None,
    warm_start: bool = False,
    min_gain: float = 0.0,
) -> LowRankResult:
    """SVDQuant's iterative low-rank refinement (deepcompressor ``calib/lowrank.py``)::

        Q_prev = 0
        for it in range(num_iters):
            up, down = svd_r(Ŵ - Q_prev)          # first iteration: plain SVD of Ŵ
            Q = Q_w(Ŵ - up @ down^T)              # residual fake-quantized (per layer of a group)
            err = ||Y - (Q_x(X̂) Q^T + X̂ down up^T)||²
            keep the best (err <= best); stop at the first increase when early_stop
            Q_prev = Q

    Faster variant (``SVDQuantOptions(search="fast")``): ``warm_start`` starts every SVD after the first from the
    previous ``down`` (:data:`WARM_POWER_ITERS` power iterations; randomized SVD only, i.e. where ``svd`` resolves
    to it), and ``min_gain > 0`` also stops once an iteration lowers the best error by less than that fraction
    (the refinement's tail gains a few thousandths of a dB per iteration).

    w_hat: ``[N, K]`` smoothed weight (rows of a group concatenated, ``splits`` rows each); x_hat: ``[M, K]``
    smoothed calibration rows; y: ``[M, N]`` reference output (default ``X̂ @ Ŵ^T``, which equals ``X @ W^T``);
    xq: ``Q_x(X̂)`` if already computed. Runs on ``w_hat``'s device.
    """
    if num_iters < 1:
        raise ConfigError(f"num_iters={num_iters} must be >= 1")
    if not 0.0 <= min_gain < 1.0:
        raise ConfigError(f"min_gain={min_gain} must lie in [0, 1)")
    w_hat = w_hat.double()
    x_hat = x_hat.to(w_hat.device)
    if y is None:
        y = x_hat.float() @ w_hat.float().t()
    if xq is None:
        xq = quantize_input_rows(x_hat, spec, act_scale)
    q_prev: torch.Tensor | float = 0.0
    best: LowRankResult | None = None
    errors: list[float] = []
    init: torch.Tensor | None = None
    for it in range(num_iters):
        up, down = lowrank_svd(w_hat - q_prev, rank, svd, init=init)
        residual = torch.addmm(w_hat, up, down.t(), alpha=-1)  # Ŵ - up @ down^T in one pass
        wq = quantize_weight_rows(residual, spec, splits)
        err = output_error(y, xq, x_hat, wq, up, down)
        errors.append(err)
        if best is None or err <= best.error:
            small_gain = best is not None and err > best.error * (1.0 - min_gain)
            best = LowRankResult(up, down, residual, wq, err, errors, it)
            if small_gain and early_stop:
                break
        elif early_stop:
            break
        if warm_start:
            init = down
        if rank == 0:  # nothing to refine: the SVD of a rank-0 branch ignores Q_prev
            break
        q_prev = wq.double()
    assert best is not None
    if math.isfinite(best.error):
        logger.debug(
            "low-rank refinement: %d iteration(s), error %.4g -> %.4g (kept iteration %d)",
            len(errors),
            errors[0],
            best.error,
            best.best_iteration,
        )
    return best
