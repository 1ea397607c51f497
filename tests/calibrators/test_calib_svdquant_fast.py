"""The fast SVDQuant calibration (``SVDQuantOptions(search="fast")``, the default) against the exhaustive one:
the coarse-to-fine search finds the grid minimum of smooth unimodal lines with a third of the evaluations, the
fast calibration's error stays within a named margin of the exhaustive one on outlier groups (also when it scores
candidates on a subset of output rows), the warm-started and small randomized SVDs stay near the optimum, and the
Gram form of the output error equals the row form."""

from __future__ import annotations

import math

import pytest
import torch

from vqsuite.calibrators import svdquant
from vqsuite.calibrators.capture import InputStats
from vqsuite.calibrators.lowrank import gram_output_error, lowrank_svd, output_error, refine_lowrank
from vqsuite.calibrators.smoothing import smoothing_grid
from vqsuite.calibrators.smoothing_search import (
    coarse_to_fine_search,
    exhaustive_search,
    get_search,
    grid_lines,
    pick_best,
)
from vqsuite.calibrators.svdquant import SVDQuantOptions, calibrate_svdquant_group
from vqsuite.config import QuantSpec, get_preset
from vqsuite.errors import ConfigError

#: the fast calibration's final error may exceed the exhaustive one's by at most this fraction (0.21 dB); measured
#: on these four cases: +0.5 % to +1.5 % (0.02 to 0.07 dB calibration SQNR)
FAST_MAX_EXCESS = 0.05
#: evaluations of the fast search on the default 39-point grid (9 coarse + at most 4 local on the best's line, 8
#: when the best coarse point is (0, 0), which lies on both lines)
FAST_MAX_EVALS = 17
#: residual norm ||W - up down^T|| of a warm-started (one power iteration) or small randomized SVD over the
#: Eckart-Young optimum (measured <= 1.004 on these matrices)
SVD_MAX_FACTOR = 1.02
#: the Gram and row forms of the output error, float64
GRAM_RTOL = 1e-4


def _group(seed: int, k: int, outs: tuple[int, ...], m: int = 384) -> tuple[list[torch.Tensor], InputStats]:
    """Weights ``[N_i, k]`` with 3 outlier columns x6 and inputs ``[m, k]`` with 3 outlier channels x25."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, k, generator=gen) * k**-0.5 for n in outs]
    for w in weights:
        w[:, :3] *= 6
    x = torch.randn(m, k, generator=gen)
    x[:, 5:8] *= 25
    stats = InputStats(k, reservoir=m)
    stats.update(x)
    return weights, stats


def test_coarse_to_fine_finds_the_minimum_of_unimodal_lines() -> None:
    n = 20
    grid = smoothing_grid(n)
    lines = grid_lines(n)
    assert [grid[i] for i in lines[0]][:2] == [(0.0, 0.0), (0.05, 0.0)]
    assert [grid[i] for i in lines[1]][-1] == pytest.approx((0.95, 0.05))
    for which, line in enumerate(lines):
        for target in range(n):
            calls: list[tuple[float, float]] = []

            def evaluate(
                alpha: float, beta: float, line: list[int] = line, target: int = target, calls: list = calls
            ) -> float:
                calls.append((alpha, beta))
                pos = round(alpha * n)
                on_line = grid.index((alpha, beta)) in line
                return (pos - target) ** 2 + (0.0 if on_line else 3.0) + 1.0

            fast = coarse_to_fine_search(n, evaluate)
            assert len(set(calls)) == len(calls)  # each candidate at most once
            full = exhaustive_search(n, evaluate)
            assert pick_best(fast) == pick_best(full) == line[target], (which, target)
            assert sum(not math.isnan(e) for e in fast) <= FAST_MAX_EVALS


def test_pick_best_rules() -> None:
    nan, inf = math.nan, math.inf
    assert pick_best([3.0, nan, 1.0, 2.0, 1.0]) == 4  # the later one among ties, nan = skipped
    assert pick_best([inf, 2.0, nan]) == 1
    with pytest.raises(RuntimeError, match="no smoothing candidate"):
        pick_best([inf, nan, inf])
    with pytest.raises(ConfigError, match="search='grid' must be one of exhaustive, fast"):
        get_search("grid")
    with pytest.raises(ConfigError, match="search='grid'"):
        SVDQuantOptions(search="grid")


CASES = {
    "single-192": (192, (192,)),
    "qkv-128": (128, (128, 128, 64)),
}


@pytest.mark.parametrize(
    ("preset", "case", "subset"),
    [
        ("svdquant-int4", "single-192", False),
        ("svdquant-int4", "qkv-128", True),
        ("svdquant-nvfp4", "qkv-128", False),
        ("svdquant-nvfp4", "single-192", True),
    ],
    ids=["int4-single-all-rows", "int4-qkv-row-subset", "nvfp4-qkv-all-rows", "nvfp4-single-row-subset"],
)
def test_fast_calibration_error_is_within_margin_of_exhaustive(
    preset: str, case: str, subset: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    k, outs = CASES[case]
    weights, stats = _group(sum(outs), k, outs)
    spec = get_preset(preset).default
    if subset:  # force the search onto a subset of output rows (FLUX-sized groups get one by default)
        monkeypatch.setattr(svdquant, "SEARCH_ROW_BUDGET", sum(outs) * k // 3)
    exh = calibrate_svdquant_group(weights, stats, spec, SVDQuantOptions(search="exhaustive"))
    fast = calibrate_svdquant_group(weights, stats, spec, SVDQuantOptions())
    assert len(exh.grid_errors) == len(fast.grid_errors) == 39 and all(map(math.isfinite, exh.grid_errors))
    assert sum(not math.isnan(e) for e in fast.grid_errors) <= FAST_MAX_EVALS
    assert len(fast.lowrank_errors) <= svdquant.FAST_LOWRANK_ITERS
    msg = f"fast {fast.sqnr_db:.3f} dB ({fast.summary()}) vs exhaustive {exh.sqnr_db:.3f} dB ({exh.summary()})"
    assert fast.error <= exh.error * (1 + FAST_MAX_EXCESS), msg
    w_cat = torch.cat(weights).double()
    recon = torch.cat(fast.residuals) + torch.cat(fast.ups) @ fast.down.t()  # the split stays exact algebra
    torch.testing.assert_close(recon, w_cat * fast.smooth, rtol=1e-9, atol=1e-9)


def test_weight_only_spec_scores_with_the_gram_and_matches_exhaustive() -> None:
    weights, stats = _group(7, 64, (96, 96), m=512)  # M = 512 > K = 64: the fast search uses X^T X
    spec = QuantSpec(weight="int4", weight_group_size=32, act=None, rank=8)
    # svd="full" on both, so the candidates differ only in how the error is computed (Gram vs rows)
    exh = calibrate_svdquant_group(weights, stats, spec, SVDQuantOptions(search="exhaustive", svd="full"))
    fast = calibrate_svdquant_group(weights, stats, spec, SVDQuantOptions(svd="full"))
    i = pick_best(fast.grid_errors)
    assert fast.grid_errors[i] == pytest.approx(exh.grid_errors[i], rel=1e-3)  # same candidate, Gram vs rows
    assert fast.error <= exh.error * (1 + FAST_MAX_EXCESS), (fast.summary(), exh.summary())


def test_gram_error_equals_row_error() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(700, 48, generator=gen, dtype=torch.float64)
    x[:, 2] *= 20
    delta = torch.randn(40, 48, generator=gen, dtype=torch.float64) * 1e-2
    rows = float((x @ delta.t()).pow(2).sum())
    assert gram_output_error(delta, x.t() @ x) == pytest.approx(rows, rel=GRAM_RTOL)
    # and the library's row form with unquantized inputs: Y - X̂ Q^T - X̂ down up^T = X̂ (Ŵ - up down^T - Q)^T
    w = torch.randn(40, 48, generator=gen, dtype=torch.float64)
    up, down = lowrank_svd(w, 4, "full")
    wq = (w - up @ down.t() - delta).float()
    y = (x @ w.t()).float()
    got = output_error(y, x.float(), x.float(), wq, up, down)
    assert got == pytest.approx(gram_output_error(w - up @ down.t() - wq.double(), x.t() @ x), rel=GRAM_RTOL)


def _opt_and_got(w: torch.Tensor, up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[float, float]:
    s = torch.linalg.svdvals(w)
    return float(s[rank:].pow(2).sum().sqrt()), float(torch.linalg.norm(w - up @ down.t()))


@pytest.mark.parametrize("shape", [(576, 192), (192, 768), (1024, 640)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_randomized_and_warm_started_svd_stay_near_the_optimum(shape: tuple[int, int]) -> None:
    """The fast mode runs the randomized SVD at every size (also below ``RANDOMIZED_MIN_DIM``), and warm-starts
    it with one power iteration from a nearby matrix's ``down``."""
    gen = torch.Generator().manual_seed(5)
    n, k = shape
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    w[:, :4] *= 8  # outlier columns, as after smoothing
    opt, cold = _opt_and_got(w, *lowrank_svd(w, 32, "randomized"), 32)
    assert opt <= cold <= opt * SVD_MAX_FACTOR, (cold, opt)
    lam = 1 + 0.1 * torch.rand(k, generator=gen, dtype=torch.float64)  # the next candidate's smoothing
    _, near_down = lowrank_svd(w, 32, "full")
    w2 = w * lam
    opt2, warm = _opt_and_got(w2, *lowrank_svd(w2, 32, "randomized", init=near_down), 32)
    assert opt2 <= warm <= opt2 * SVD_MAX_FACTOR, (warm, opt2)
    with pytest.raises(ValueError, match="init must be"):
        lowrank_svd(w, 32, "randomized", init=near_down[:-1])


def test_refinement_min_gain_stops_early_and_keeps_the_best() -> None:
    weights, stats = _group(11, 128, (192,))
    spec = get_preset("svdquant-int4").default
    w, x = weights[0].double(), stats.sample
    full = refine_lowrank(w, x, spec, 16, svd="randomized")
    fast = refine_lowrank(w, x, spec, 16, svd="randomized", warm_start=True, min_gain=0.01)
    assert fast.iterations <= full.iterations and fast.error <= fast.errors[0]
    assert fast.error == min(fast.errors) and fast.errors[0] == full.errors[0]  # same cold first SVD
    gains = [1 - b / a for a, b in zip(fast.errors, fast.errors[1:], strict=False)]
    assert all(g >= 0.01 for g in gains[:-1]), gains  # it went on only while an iteration gained >= 1 %
    with pytest.raises(ConfigError, match="min_gain"):
        refine_lowrank(w, x, spec, 16, min_gain=1.0)
