"""SVDQuant calibration (deepcompressor's algorithm): smoothing grid search, shared low-rank branch, iterative
refinement, optional GPTQ on the residual.

For a group of linear layers that read the same input (q/k/v; in FLUX single blocks also the MLP up-projection)::

    for (α, β) in smoothing_grid(num_grids):                    # 39 candidates for num_grids=20
        λ = max|X|^α / max|W_group|^β                            # one λ for the whole group
        up, down = svd_r(concat_rows(W_i · diag(λ)))             # shared down-projection
        err = Σ_i ||Y_i - (Q_x(X/λ) Q_w(R_i)^T + (X/λ) down up_i^T)||²   on the calibration rows
    keep the (α, β) with the smallest err (a later candidate wins a tie, as in deepcompressor)
    refine_lowrank(...)                                          # iterate SVD(Ŵ - Q_prev), early stop
    optionally GPTQ(R_i) with the Hessian of X/λ                 # codes kept exactly (QTensor)

That loop is ``SVDQuantOptions(search="exhaustive")``. The default ``search="fast"`` computes the same objective
with less work (see :class:`SVDQuantOptions`): a coarse-to-fine walk over the grid
(:mod:`vqsuite.calibrators.smoothing_search`, ~13 of 39 candidates), scored on a seeded subset of the group's
output rows on large layers, each candidate's randomized SVD warm-started from the previous one's subspace, then a
warm-started refinement that stops when it gains less than 0.1 % (at most 8 iterations).

Calibrators produce plain state (:class:`SVDQuantGroupState`); :func:`build_lowrank_layers` turns it into
``QLinearLowRank`` layers (fake-quant state) whose ``proj_down`` is one shared Parameter.

Differences from deepcompressor, on purpose:
* The objective of a q/k/v group is the summed output error of its projections; deepcompressor evaluates the
  output of the whole attention module (``eval_module=attn``), which needs model-specific code.
* In FLUX single blocks deepcompressor shares λ between q/k/v and the MLP up-projection but gives the MLP its
  own low-rank branch (``splits``); here a detected shared-input group shares both λ and ``proj_down``.
* Calibration statistics come from one pass of the float model (deepcompressor re-collects block by block).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqsuite.calibrators.capture import DEFAULT_RESERVOIR, InputStats
from vqsuite.calibrators.gptq import DEFAULT_BLOCK, DEFAULT_DAMP, gptq_quantize, hessian_from_inputs
from vqsuite.calibrators.lowrank import (
    DEFAULT_LOWRANK_ITERS,
    SVD_METHODS,
    gram_output_error,
    lowrank_svd,
    output_error,
    quantize_input_rows,
    quantize_weight_rows,
    refine_lowrank,
)
from vqsuite.calibrators.smoothing import (
    DEFAULT_NUM_GRIDS,
    FAST_NUM_GRIDS,
    smooth_factors,
    smoothing_grid,
    weight_column_absmax,
)
from vqsuite.calibrators.smoothing_search import SEARCHES, get_search, pick_best
from vqsuite.config import QuantSpec
from vqsuite.errors import ConfigError, UserError
from vqsuite.formats import QTensor, dequantize
from vqsuite.nn import FLOAT_CONV_TRANSPOSE_TYPES, FLOAT_CONV_TYPES, FLOAT_LOWRANK_CONV_TWINS, QLinearLowRank
from vqsuite.nn.base import QuantLayer, copy_float_params
from vqsuite.nn.quantizers import static_scale_from_amax

logger = logging.getLogger(__name__)

#: ``search="fast"`` scores the smoothing candidates on a seeded random subset of the group's output rows
#: (weight rows; each layer keeps the same fraction) holding about this many weight elements (rows x K); the
#: output error is a sum over rows, so the subset's error, scaled by N / |subset|, estimates the whole group's,
#: and every candidate sees the same subset. 2048 x 3072: a FLUX q/k/v group is scored on 2/9 of its rows.
SEARCH_ROW_BUDGET = 2048 * 3072
#: power iterations of a search candidate's randomized SVD warm-started from the previous candidate's ``down``
SEARCH_POWER_ITERS = 1
#: ``search="fast"`` stops the low-rank refinement once an iteration gains less than this fraction of the error
#: (0.1 %, 0.004 dB); the exhaustive mode keeps deepcompressor's stop at the first increase
LOWRANK_MIN_GAIN = 1e-3
#: ``search="fast"`` runs at most this many refinement iterations (the exhaustive mode up to ``lowrank_iters``):
#: warm-started, the refinement keeps gaining a little for tens of iterations (FLUX q/k/v: +0.08 dB by iteration 8,
#: +0.03 dB more by 20)
FAST_LOWRANK_ITERS = 8
#: seed of the search's output-row subset
SEARCH_SEED = 0


@dataclass(frozen=True)
class SVDQuantOptions:
    """Knobs of the SVDQuant calibration (``QuantConfig.options`` of ``method="svdquant"`` carries them).

    The branch rank is the spec's ``rank`` (32 in the presets), so layer validation and calibration agree.

    Attributes:
        num_grids: smoothing grid resolution (``2·num_grids - 1`` candidates); deepcompressor default 20.
        fast: deepcompressor's ``fast.yaml`` grid (``num_grids=10``); overrides ``num_grids``.
        search: how the grid is searched (:data:`vqsuite.calibrators.smoothing_search.SEARCHES`): ``"fast"``
            (default: coarse-to-fine over ~13 of the 39 candidates, scored on a subset of output rows of at most
            :data:`SEARCH_ROW_BUDGET` weight elements, warm-started SVDs; then a warm-started refinement that
            also stops when an iteration gains < :data:`LOWRANK_MIN_GAIN`, at most :data:`FAST_LOWRANK_ITERS`
            iterations) or ``"exhaustive"`` (deepcompressor: every candidate on every row, cold SVDs,
            refinement until the first increase).
        lowrank_iters: maximum low-rank refinement iterations (100); early_stop: stop at the first increase.
        gptq: quantize the residual with GPTQ (damp ``gptq_damp``, block ``gptq_block``); ``gptq_scale_mode``
            ``"dynamic"`` (group scales on entry) or ``"static"`` (deepcompressor: up front, act order).
        gptq_gram: let ``quantize_model`` capture the full ``X^T X`` of every layer for the Hessian
            (``K²`` float64 per layer) instead of using the reservoir sample.
        svd: ``"auto"``, ``"full"`` or ``"randomized"`` (see :func:`vqsuite.calibrators.lowrank.lowrank_svd`).
        max_samples: use at most this many calibration rows (tokens) in the objectives; ``None``: all kept.
        reservoir: rows ``quantize_model`` keeps per layer while capturing (bounded memory).
        device: where the calibration math runs (``"cuda"``, ``"cpu"``); ``None``: the layer's device.
    """

    num_grids: int = DEFAULT_NUM_GRIDS
    fast: bool = False
    search: str = "fast"
    lowrank_iters: int = DEFAULT_LOWRANK_ITERS
    early_stop: bool = True
    gptq: bool = False
    gptq_damp: float = DEFAULT_DAMP
    gptq_block: int = DEFAULT_BLOCK
    gptq_scale_mode: str = "dynamic"
    gptq_gram: bool = False
    svd: str = "auto"
    max_samples: int | None = None
    reservoir: int = DEFAULT_RESERVOIR
    device: str | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1" + (" or None" if allow_none else ""))

        positive_int("num_grids")
        positive_int("lowrank_iters")
        positive_int("gptq_block")
        positive_int("max_samples", allow_none=True)
        positive_int("reservoir")
        for name in ("fast", "early_stop", "gptq", "gptq_gram"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a bool")
        if not isinstance(self.gptq_damp, (int, float)) or isinstance(self.gptq_damp, bool) or self.gptq_damp < 0:
            raise ConfigError(f"gptq_damp={self.gptq_damp!r} must be a number >= 0")
        if self.gptq_scale_mode not in ("dynamic", "static"):
            raise ConfigError(f"gptq_scale_mode={self.gptq_scale_mode!r} must be 'dynamic' or 'static'")
        if self.search not in SEARCHES:
            raise ConfigError(f"search={self.search!r} must be one of {', '.join(SEARCHES)}")
        if self.svd not in SVD_METHODS:
            raise ConfigError(f"svd={self.svd!r} must be one of {', '.join(SVD_METHODS)}")

    @property
    def grid_size(self) -> int:
        """The ``num_grids`` in effect (``fast`` overrides it)."""
        return FAST_NUM_GRIDS if self.fast else self.num_grids

    @property
    def grid(self) -> list[tuple[float, float]]:
        return smoothing_grid(self.grid_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SVDQuantOptions:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown SVDQuant option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class SVDQuantGroupState:
    """Plain calibration result for a group of ``n`` layers sharing one input of ``K`` channels.

    Attributes:
        smooth: ``[K]`` float64 λ (already rounded to the layers' dtype); alpha, beta: the chosen pair.
        down: ``[K, r]`` float64 shared down-projection; ups: ``n`` × ``[N_i, r]`` float64.
        residuals: ``n`` × ``[N_i, K]`` float64 ``W_i·diag(λ) - up_i @ down^T``.
        qtensors: ``n`` GPTQ results (``None`` without GPTQ).
        grid_errors: output error of every grid candidate (``inf`` for an unusable λ), in grid order; with
            ``search="fast"`` ``nan`` for a candidate the search skipped, and the others estimated on a subset of
            output rows (scaled to the whole group).
        lowrank_errors: output error of every refinement iteration run.
        error: the final output error on the calibration rows (after GPTQ when used); error_rtn: the same before
            GPTQ (the refinement's best).
        reference_energy: ``Σ||Y_i||²`` on the calibration rows (SQNR = 10·log10(energy / error)).
        act_scale: 0-d static activation scale of the smoothed input (``act_mode="static"`` specs), else ``None``.
    """

    smooth: torch.Tensor
    alpha: float
    beta: float
    rank: int
    down: torch.Tensor
    ups: list[torch.Tensor]
    residuals: list[torch.Tensor]
    qtensors: list[QTensor | None]
    grid_errors: list[float] = field(default_factory=list)
    lowrank_errors: list[float] = field(default_factory=list)
    error: float = float("nan")
    error_rtn: float = float("nan")
    reference_energy: float = float("nan")
    n_rows: int = 0
    act_scale: torch.Tensor | None = None

    @property
    def sqnr_db(self) -> float:
        """Output SQNR of the group on its calibration rows."""
        return 10 * math.log10(self.reference_energy / self.error) if self.error > 0 else float("inf")

    def summary(self) -> str:
        """One line for reports: rank, (α, β), refinement iterations, calibration SQNR."""
        gptq = ", GPTQ" if any(q is not None for q in self.qtensors) else ""
        return (
            f"svdquant rank {self.rank}, alpha={self.alpha:.3g} beta={self.beta:.3g}, "
            f"{len(self.lowrank_errors)} low-rank iter(s){gptq}, calib SQNR {self.sqnr_db:.1f} dB "
            f"on {self.n_rows} rows"
        )

    def info(self) -> dict[str, Any]:
        """The numbers of this state without its tensors (what a layer keeps as ``svdquant_info``)."""
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "rank": self.rank,
            "grid_errors": list(self.grid_errors),
            "lowrank_errors": list(self.lowrank_errors),
            "error": self.error,
            "error_rtn": self.error_rtn,
            "reference_energy": self.reference_energy,
            "sqnr_db": self.sqnr_db,
            "n_rows": self.n_rows,
            "gptq": any(q is not None for q in self.qtensors),
            "summary": self.summary(),
        }


def _calibration_rows(stats: InputStats, max_samples: int | None, device: torch.device) -> torch.Tensor:
    x = stats.sample
    if x.shape[0] == 0:
        raise UserError("the input statistics hold no rows; run calibration data through the layers first")
    if max_samples is not None and x.shape[0] > max_samples:
        x = x[:max_samples]  # the reservoir is already a uniform random sample: its first rows are one too
    return x.to(device=device, dtype=torch.float32)


def _offsets(splits: list[int]) -> list[int]:
    return [sum(splits[:i]) for i in range(len(splits))]


def _search_rows(splits: list[int], k: int, rank: int) -> torch.Tensor | None:
    """Sorted indices of the fast search's output-row subset (every layer keeps the same fraction, at least
    ``2·rank`` rows, all if fewer), or ``None`` when the whole group fits :data:`SEARCH_ROW_BUDGET`."""
    n = sum(splits)
    if n * k <= SEARCH_ROW_BUDGET:
        return None
    frac = SEARCH_ROW_BUDGET / (n * k)
    gen = torch.Generator().manual_seed(SEARCH_SEED)
    picked = []
    for lo, n_i in zip(_offsets(splits), splits, strict=True):
        keep = min(n_i, max(math.ceil(n_i * frac), 2 * rank))
        picked.append(torch.randperm(n_i, generator=gen)[:keep].sort().values + lo)
    return torch.cat(picked)


def _static_act_scale(spec: QuantSpec, x_absmax: torch.Tensor, lam: torch.Tensor) -> torch.Tensor | None:
    """A static per-tensor scale for the smoothed input (exact: λ is per channel, so max|X/λ| = max(absmax/λ))."""
    if spec.act_mode != "static":
        return None
    return static_scale_from_amax((x_absmax.double().to(lam.device) / lam).amax(), spec.act)


def _tie_taps(v: torch.Tensor, taps: int) -> torch.Tensor:
    """``[C·taps]`` -> each channel's max over its taps, repeated (λ per input channel of a conv)."""
    return v if taps == 1 else v.reshape(-1, taps).amax(dim=1).repeat_interleave(taps)


def _rows_quantizer(taps: int) -> Callable[..., torch.Tensor]:
    """Activation fake-quant of calibration rows: per row (a token, a transposed conv's pixel), or for im2col rows
    ``[M, C·taps]`` per pixel across the C channels (each row holds ``taps`` pixels), as the conv layer does."""
    if taps == 1:
        return quantize_input_rows

    def per_pixel(x_hat: torch.Tensor, spec: QuantSpec, act_scale: torch.Tensor | None = None) -> torch.Tensor:
        m, k = x_hat.shape
        pixels = x_hat.reshape(m, k // taps, taps).transpose(1, 2).reshape(m * taps, k // taps)
        xq = quantize_input_rows(pixels, spec, act_scale)
        return xq.reshape(m, taps, k // taps).transpose(1, 2).reshape(m, k)

    return per_pixel


@torch.no_grad()
def calibrate_svdquant_group(
    weights: list[torch.Tensor],
    stats: InputStats,
    spec: QuantSpec,
    options: SVDQuantOptions | None = None,
    *,
    dtype: torch.dtype | None = None,
    taps: int = 1,
) -> SVDQuantGroupState:
    """SVDQuant state for layers ``weights`` (``[N_i, K]`` each) that all read the input described by ``stats``.

    ``dtype``: the layers' parameter dtype; λ is rounded to it before anything is computed with it, so the
    stored smoothing vector is the one the search scored. The math runs on ``options.device`` (default: the
    first weight's device).

    ``taps``: GEMM columns per input channel, ``prod(kernel)`` for a conv whose ``stats`` rows are im2col rows
    (:func:`conv_gemm_rows`; K ordered channel, then tap). λ is then tied per channel (from the channel's max over
    its taps, so ``state.smooth`` holds it repeated ``taps`` times) and activations are quantized per pixel across
    channels, as the conv layer does; the rest of the search is the Linear one on the GEMM view.
    """
    options = options or SVDQuantOptions()
    if not weights:
        raise ValueError("weights is empty")
    k = weights[0].shape[1]
    if stats.in_features != k:
        raise ValueError(f"stats describe {stats.in_features} input channels, the weights have K={k}")
    rank = spec.rank
    for w in weights:
        if w.ndim != 2 or w.shape[1] != k:
            raise ValueError(f"every weight must be [N, {k}], got {tuple(w.shape)}")
        if rank > min(w.shape):
            raise ConfigError(f"rank={rank} exceeds min(out_features, in_features)={min(w.shape)} of a layer")
    device = torch.device(options.device) if options.device is not None else weights[0].device
    dtype = dtype or weights[0].dtype
    splits = [w.shape[0] for w in weights]
    w_cat = torch.cat([w.detach().to(device=device, dtype=torch.float64) for w in weights], dim=0)
    x = _calibration_rows(stats, options.max_samples, device)
    y = x @ w_cat.float().t()  # reference output without bias (the bias cancels in every error)
    x_absmax = _tie_taps(stats.absmax.double().to(device), taps)
    w_absmax = _tie_taps(weight_column_absmax(weights).to(device), taps)
    # the calibration rows are quantized as the layer quantizes its input (per pixel for im2col rows)
    quantize_input_rows = _rows_quantizer(taps)

    fast = options.search == "fast"
    # the fast mode warm-starts its SVDs, which only the randomized one can use; its range finder spans the
    # rank-r subspace as well as the full SVD's for the search and the refinement (test_calib_svdquant_fast.py)
    svd = "randomized" if fast and options.svd == "auto" else options.svd
    rows = _search_rows(splits, k, rank) if fast else None
    w_search, y_search, splits_search = w_cat, y, splits
    if rows is not None:
        w_search, y_search = w_cat[rows], y[:, rows]
        splits_search = [int(((rows >= lo) & (rows < lo + n)).sum()) for lo, n in zip(_offsets(splits), splits)]
    scale = w_cat.shape[0] / w_search.shape[0]  # a subset's error estimates the whole group's
    # unquantized activations: the output error is ||X̂ Δ^T||² = tr(Δ Ĝ Δ^T), cheaper from the Gram when M > K
    acts_float = spec.act is None or spec.act_mode == "none"
    gram = x.double().t() @ x.double() if fast and acts_float and x.shape[0] > k else None
    prev_down: list[torch.Tensor] = []

    def evaluate(alpha: float, beta: float) -> float:
        """Output error of the candidate (α, β): smoothing, rank-r SVD, quantized residual (``inf``: bad λ)."""
        lam = smooth_factors(x_absmax, w_absmax, alpha, beta).to(dtype).double()
        if not bool(torch.isfinite(lam).all()) or not bool((lam > 0).all()):
            return float("inf")  # λ does not survive rounding to the layer dtype
        x_hat = x / lam.float()
        w_hat = w_search * lam
        xq = quantize_input_rows(x_hat, spec, _static_act_scale(spec, x_absmax, lam))
        init = prev_down[-1] if fast and prev_down else None
        up, down = lowrank_svd(
            w_hat, rank, svd, init=init, power_iters=SEARCH_POWER_ITERS if init is not None else None
        )
        prev_down[:] = [down]
        residual = torch.addmm(w_hat, up, down.t(), alpha=-1)
        wq = quantize_weight_rows(residual, spec, splits_search)
        if gram is not None:
            inv = 1.0 / lam
            return gram_output_error(residual - wq.double(), gram * inv[:, None] * inv[None, :]) * scale
        return output_error(y_search, xq, x_hat, wq, up, down) * scale

    grid_errors = get_search(options.search)(options.grid_size, evaluate)
    alpha, beta = options.grid[pick_best(grid_errors)]
    lam = smooth_factors(x_absmax, w_absmax, alpha, beta).to(dtype).double()

    x_hat = x / lam.float()
    w_hat = w_cat * lam
    act_scale = _static_act_scale(spec, x_absmax, lam)
    xq = quantize_input_rows(x_hat, spec, act_scale)
    lr = refine_lowrank(
        w_hat,
        x_hat,
        spec,
        rank,
        y=y,
        xq=xq,
        splits=splits,
        num_iters=min(options.lowrank_iters, FAST_LOWRANK_ITERS) if fast else options.lowrank_iters,
        early_stop=options.early_stop,
        svd=svd,
        act_scale=act_scale,
        warm_start=fast,
        min_gain=LOWRANK_MIN_GAIN if fast else 0.0,
    )
    residuals = list(torch.split(lr.residual, splits, dim=0))
    ups = list(torch.split(lr.up, splits, dim=0))
    qtensors: list[QTensor | None] = [None] * len(weights)
    error = lr.error
    if options.gptq and spec.weight is not None:
        if stats.gram is not None and stats.n_rows > 0:
            inv = 1.0 / lam
            h = stats.gram.to(device=device, dtype=torch.float64) * inv[:, None] * inv[None, :] * (2.0 / stats.n_rows)
        else:
            h = hessian_from_inputs(x_hat)
        qtensors = [
            gptq_quantize(
                r.float(),
                h,
                spec,
                damp=options.gptq_damp,
                block_size=options.gptq_block,
                scale_mode=options.gptq_scale_mode,
            )
            for r in residuals
        ]
        wq = torch.cat([dequantize(qt, torch.float32) for qt in qtensors], dim=0)
        error = output_error(y, xq, x_hat, wq, lr.up, lr.down)
    state = SVDQuantGroupState(
        smooth=lam,
        alpha=alpha,
        beta=beta,
        rank=rank,
        down=lr.down,
        ups=ups,
        residuals=residuals,
        qtensors=qtensors,
        grid_errors=grid_errors,
        lowrank_errors=list(lr.errors),
        error=error,
        error_rtn=lr.error,
        reference_energy=float(y.double().pow(2).sum()),
        n_rows=x.shape[0],
        act_scale=act_scale,
    )
    logger.debug("svdquant group of %d layer(s): %s", len(weights), state.summary())
    return state


# ------------------------------------------------------------------------------------------ convolutions
#: im2col rows a conv's capture hook keeps per forward call (a uniform random subset of the call's output pixels):
#: bounds the memory of unfolding a large feature map; the reservoir then samples across calls
CONV_ROWS_PER_CALL = 4096


def conv_gemm_weight(conv: nn.Module) -> torch.Tensor:
    """A float conv's weight in its quantized layer's GEMM view (``groups == 1``): ``[O, C·prod(k)]`` for a conv,
    ``[O·prod(k), C]`` (rows ordered output channel, then tap) for a transposed conv."""
    w = conv.weight
    if isinstance(conv, FLOAT_CONV_TRANSPOSE_TYPES):  # [C, O, *k] -> [O, *k, C]
        return w.movedim(0, -1).reshape(-1, w.shape[0])
    return w.reshape(w.shape[0], -1)


def conv_taps(conv: nn.Module) -> int:
    """GEMM columns per input channel: ``prod(kernel)`` for a conv, 1 for a transposed conv."""
    return 1 if isinstance(conv, FLOAT_CONV_TRANSPOSE_TYPES) else math.prod(conv.kernel_size)


def _conv_padded(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x [B, C, *spatial]`` padded as the conv pads it (``padding`` ints or ``"same"``/``"valid"``, any mode)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x
        pads = []  # "same" (stride 1): the extra element goes after, as torch does
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in conv.padding]
    flat = [v for pair in reversed(pads) for v in pair]
    if not any(flat):
        return x
    return F.pad(x, flat) if conv.padding_mode == "zeros" else F.pad(x, flat, mode=conv.padding_mode)


def conv_gemm_rows(conv: nn.Module, x: torch.Tensor, max_rows: int | None = None, seed: int = 0) -> torch.Tensor:
    """The GEMM-view input rows of a float conv (``groups == 1``) for input ``x [B, C, *spatial]`` (or unbatched):
    ``rows @ conv_gemm_weight(conv).T`` is the GEMM the quantized layer runs.

    Conv: im2col rows ``[B·prod(out), C·prod(k)]`` (K ordered channel, then tap; the layer's padding, stride and
    dilation). Transposed conv: its input pixels ``[B·prod(in), C]`` (col2im of ``rows @ W^T`` is the output).
    ``max_rows``: keep a uniform random subset of at most that many rows (``seed``), chosen before unfolding.
    """
    dims = len(conv.kernel_size)
    if x.ndim == dims + 1:
        x = x.unsqueeze(0)
    if isinstance(conv, FLOAT_CONV_TRANSPOSE_TYPES):
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])
        if max_rows is not None and rows.shape[0] > max_rows:
            gen = torch.Generator().manual_seed(seed)
            rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows].to(rows.device)]
        return rows
    x = _conv_padded(conv, x)
    windows = x
    for i, (k, s, d) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)):
        windows = windows.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # [B, C, *out, *k] after the loop
    b, c = windows.shape[:2]
    out_shape = tuple(windows.shape[2 : 2 + dims])
    # [B, C, *out, *k] -> [B, *out, C, *k] (still a strided view): rows are output pixels, columns (channel, tap)
    windows = windows.movedim(1, 1 + dims)
    n_rows = b * math.prod(out_shape)
    if max_rows is not None and n_rows > max_rows:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n_rows, generator=gen)[:max_rows].to(x.device)
        windows = windows[torch.unravel_index(idx, (b, *out_shape))]  # only the kept rows are materialised
    return windows.reshape(-1, c * conv_taps(conv))


def _flat_rows(rows: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """``rows [R, K]`` shaped so the capture hooks read them as rows: an N-D conv's hook moves dim ``-(N + 1)`` of a
    ``N + 1``- or ``N + 2``-dim input to the end, which a 2-D (or, for Conv1d, 4-D) tensor never is."""
    return rows.reshape(1, 1, *rows.shape) if len(conv.kernel_size) == 1 else rows


def conv_capture_transform(
    convs: dict[str, nn.Module], max_rows: int = CONV_ROWS_PER_CALL
) -> Callable[[str, nn.Module, torch.Tensor], torch.Tensor]:
    """A ``capture_inputs`` transform: the inputs of the convs named in ``convs`` (name -> the float conv whose
    geometry applies, an adapter's effective layer) become their GEMM rows (at most ``max_rows`` per call)."""
    calls: dict[str, int] = {}

    def transform(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        conv = convs.get(name)
        if conv is None:
            return x
        calls[name] = calls.get(name, 0) + 1
        rows = conv_gemm_rows(conv, x.detach(), max_rows, seed=calls[name])
        return _flat_rows(rows, conv)

    return transform


def _lowrank_twin(conv: nn.Module) -> type[QuantLayer]:
    return FLOAT_LOWRANK_CONV_TWINS[next(t for t in FLOAT_LOWRANK_CONV_TWINS if isinstance(conv, t))]


@torch.no_grad()
def build_lowrank_layers(linears: list[nn.Linear], state: SVDQuantGroupState, spec: QuantSpec) -> list[QLinearLowRank]:
    """``QLinearLowRank`` layers (fake-quant state) holding ``state``.

    Every layer gets λ, its residual as master weight, its slice of ``proj_up``; they all hold the *same*
    ``proj_down`` Parameter object (``save_quantized`` stores it once, ``load_quantized`` re-ties it). A GPTQ
    QTensor is adopted with ``set_pending_qtensor``, so ``freeze()`` stores exactly GPTQ's codes. A static
    activation scale (``act_mode="static"``) is set from the calibration rows. Do not re-split one member with
    ``set_smoothing_and_lowrank``: it would rewrite the ``proj_down`` the other members share.

    A single float conv (``groups == 1``) becomes its low-rank twin (:class:`~vqsuite.nn.QConv2dLowRank` & co) holding
    λ per input channel (``state.smooth`` is the GEMM view's, one value repeated per tap).
    """
    if len(linears) != len(state.residuals):
        raise ValueError(f"{len(linears)} layers for a state of {len(state.residuals)}")
    if isinstance(linears[0], FLOAT_CONV_TYPES):
        _check_svdquant_layers(linears)  # a conv is calibrated, and built, on its own
        return [_build_lowrank_conv(linears[0], state, spec)]
    first = linears[0].weight
    shared_down = None
    if state.rank > 0:
        shared_down = nn.Parameter(state.down.to(device=first.device, dtype=first.dtype))
    out = []
    for lin, residual, up, qt in zip(linears, state.residuals, state.ups, state.qtensors, strict=True):
        w = lin.weight
        q = QLinearLowRank(
            lin.in_features, lin.out_features, lin.bias is not None, spec, state.rank, device=w.device, dtype=w.dtype
        )
        copy_float_params(q, lin)
        q.smooth.copy_(state.smooth.to(q.smooth.device))
        q.__dict__["_parameters"]["weight"].copy_(residual.to(w.device))
        if shared_down is not None:
            q.proj_up.copy_(up.to(w.device))
            q.proj_down = shared_down
        if qt is not None:
            q.set_pending_qtensor(qt)
        if state.act_scale is not None and getattr(q, "act_scale", None) is not None:
            q.act_scale.copy_(state.act_scale.to(q.act_scale.device))
        out.append(q)
    return out


def _build_lowrank_conv(conv: nn.Module, state: SVDQuantGroupState, spec: QuantSpec) -> QuantLayer:
    """The low-rank twin of a float conv (``groups == 1``) holding ``state`` (fake-quant state): λ per input channel
    (``state.smooth`` is the GEMM view's, repeated per tap), the GEMM residual, the branch."""
    q = _lowrank_twin(conv).from_float(conv, spec.replace(rank=state.rank), split=False)
    taps = conv_taps(conv)
    (residual,), (up,), (qt,) = state.residuals, state.ups, state.qtensors
    q.set_lowrank_state(state.smooth[::taps], residual, up if state.rank else None, state.down if state.rank else None)
    if qt is not None:
        q.set_pending_qtensor(qt)
    if state.act_scale is not None and getattr(q, "act_scale", None) is not None:
        q.act_scale.copy_(state.act_scale.to(q.act_scale.device))
    return q


def _check_svdquant_layers(layers: list[nn.Module]) -> None:
    if not layers:
        raise UserError("linears is empty")
    for lin in layers:
        if isinstance(lin, FLOAT_CONV_TYPES):
            if len(layers) != 1:
                raise UserError(f"a conv is calibrated on its own, got a group of {len(layers)} layers")
            if lin.groups != 1:
                raise UserError(f"svdquant_group: a {type(lin).__name__} with groups={lin.groups} has no branch")
        elif not isinstance(lin, nn.Linear):
            raise UserError(f"svdquant_group takes nn.Linear or conv layers, got {type(lin).__name__}")


@torch.no_grad()
def svdquant_group(
    linears: list[nn.Module],
    stats: InputStats,
    spec: QuantSpec,
    options: SVDQuantOptions | None = None,
) -> list[QuantLayer]:
    """Calibrate SVDQuant for ``linears`` (which all read the input ``stats`` describes) and build their
    ``QLinearLowRank`` replacements in the fake-quant state; ``layer.svdquant_info`` holds the group's numbers
    (:meth:`SVDQuantGroupState.info`: α, β, rank, errors, calibration SQNR).

    A conv (``groups == 1``, alone in its group) is calibrated the same way on its GEMM view: ``stats`` must hold
    its GEMM rows (:func:`conv_gemm_rows`, :func:`conv_capture_transform`); it becomes its low-rank twin
    (:class:`~vqsuite.nn.QConv2dLowRank` & co)."""
    _check_svdquant_layers(linears)
    is_conv = isinstance(linears[0], FLOAT_CONV_TYPES)
    weights = [conv_gemm_weight(linears[0])] if is_conv else [lin.weight for lin in linears]
    taps = conv_taps(linears[0]) if is_conv else 1
    state = calibrate_svdquant_group(weights, stats, spec, options, dtype=linears[0].weight.dtype, taps=taps)
    layers = build_lowrank_layers(linears, state, spec)
    info = state.info()
    for q in layers:
        q.svdquant_info = info
    return layers


def data_free_lowrank_layer(linear: nn.Module, spec: QuantSpec) -> QuantLayer:
    """SVDQuant without calibration data: λ = 1 and the rank-r SVD of W (no search, no refinement); a conv
    (``groups == 1``) becomes its low-rank twin, split in its GEMM view."""
    if isinstance(linear, FLOAT_CONV_TYPES):
        return _lowrank_twin(linear).from_float(linear, spec)
    return QLinearLowRank.from_float(linear, spec)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``10·log10(||ref||² / ||ref - approx||²)`` in dB (float64)."""
    ref = reference.detach().double()
    err = (ref - approx.detach().double().to(ref.device)).pow(2).sum()
    if float(err) == 0:
        return float("inf")
    return 10 * math.log10(float(ref.pow(2).sum()) / float(err))


__all__ = [
    "CONV_ROWS_PER_CALL",
    "SVDQuantGroupState",
    "SVDQuantOptions",
    "build_lowrank_layers",
    "calibrate_svdquant_group",
    "conv_capture_transform",
    "conv_gemm_rows",
    "conv_gemm_weight",
    "data_free_lowrank_layer",
    "sqnr_db",
    "svdquant_group",
]
