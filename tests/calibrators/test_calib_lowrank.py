"""The low-rank branch: float64 full SVD is the Eckart-Young optimum, the randomized SVD stays within a named
tolerance of it, ``auto`` switches on size, and the refinement loop keeps the best iterate and stops early."""

from __future__ import annotations

import math

import pytest
import torch

from vqsuite.calibrators import lowrank
from vqsuite.calibrators.lowrank import (
    lowrank_svd,
    output_error,
    quantize_input_rows,
    quantize_weight_rows,
    refine_lowrank,
)
from vqsuite.config import get_preset
from vqsuite.formats import fake_quantize

RANK = 32
#: randomized SVD: the residual norm ||W - up down^T|| may exceed the optimum by at most this fraction
#: (measured with 16 oversamples and 4 power iterations: <= 1.5e-3 on decaying spectra, <= 5.2e-3 on a flat one;
#: <= 1.7e-3 on 3072x3072 weights, where the full SVD takes 7 s and the randomized one 0.2 s on 2 cores)
RANDOMIZED_REL_TOL = 1e-2
#: float64 identities
F64_RTOL = 1e-10
INT4 = get_preset("svdquant-int4").default
NVFP4 = get_preset("svdquant-nvfp4").default


def _weight(n: int, k: int, seed: int = 0, decay: float = 0.05) -> torch.Tensor:
    """A weight with a decaying spectrum plus a flat noise floor (what trained layers look like)."""
    gen = torch.Generator().manual_seed(seed)
    r = min(n, k)
    u, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64))
    s = torch.exp(-decay * torch.arange(r, dtype=torch.float64)) + 0.05
    return (u * s) @ v.t() + 0.01 * torch.randn(n, k, generator=gen, dtype=torch.float64)


def _rel_err(w: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    return float(torch.linalg.norm(w - up @ down.t()) / torch.linalg.norm(w))


def test_full_svd_is_the_eckart_young_optimum() -> None:
    w = _weight(96, 80)
    up, down = lowrank_svd(w, 8, "full")
    assert up.shape == (96, 8) and down.shape == (80, 8) and up.dtype == torch.float64
    s = torch.linalg.svdvals(w)
    assert math.isclose(float(torch.linalg.norm(w - up @ down.t())), float(s[8:].pow(2).sum().sqrt()), rel_tol=1e-9)
    torch.testing.assert_close(down.t() @ down, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(600, 400), (300, 700)], ids=["tall", "wide"])
@pytest.mark.parametrize("decay", [0.05, 0.0], ids=["decaying", "flat"])
def test_randomized_svd_is_within_tolerance_of_the_full_one(shape: tuple[int, int], decay: float) -> None:
    w = _weight(*shape, decay=decay)
    opt = _rel_err(w, *lowrank_svd(w, RANK, "full"))
    rnd = _rel_err(w, *lowrank_svd(w, RANK, "randomized"))
    assert rnd >= opt * (1 - 1e-12)  # nothing beats the optimum
    assert rnd <= opt * (1 + RANDOMIZED_REL_TOL), f"randomized {rnd:.6g} vs optimum {opt:.6g}"


def test_randomized_svd_is_deterministic() -> None:
    w = _weight(300, 200)
    a, b = lowrank_svd(w, RANK, "randomized"), lowrank_svd(w, RANK, "randomized")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_auto_switches_to_randomized_for_large_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weight(200, 150)
    full, rnd = lowrank_svd(w, 8, "full"), lowrank_svd(w, 8, "randomized")
    assert torch.equal(lowrank_svd(w, 8, "auto")[0], full[0])
    monkeypatch.setattr(lowrank, "RANDOMIZED_MIN_DIM", 100)  # min(N, K) = 150 is now "large"
    assert torch.equal(lowrank_svd(w, 8, "auto")[0], rnd[0])


def test_rank_zero_and_bad_arguments() -> None:
    up, down = lowrank_svd(torch.randn(5, 4), 0)
    assert up.shape == (5, 0) and down.shape == (4, 0)
    with pytest.raises(ValueError, match="rank=6 must lie in"):
        lowrank_svd(torch.randn(5, 4), 6)
    with pytest.raises(ValueError, match="method='qr'"):
        lowrank_svd(torch.randn(5, 4), 2, "qr")


def test_group_rows_are_quantized_layer_by_layer() -> None:
    """NVFP4's tensor scale is per layer: quantizing a q/k/v stack must match quantizing each layer alone."""
    parts = [torch.randn(32, 64), 10 * torch.randn(16, 64), torch.randn(8, 64)]
    got = quantize_weight_rows(torch.cat(parts), NVFP4, [32, 16, 8])
    want = torch.cat([fake_quantize(p, "nvfp4") for p in parts])
    assert torch.equal(got, want)
    assert not torch.equal(got, quantize_weight_rows(torch.cat(parts), NVFP4))
    with pytest.raises(ValueError, match="do not add up"):
        quantize_weight_rows(torch.cat(parts), NVFP4, [32, 16])


def test_output_error_is_the_squared_frobenius_norm() -> None:
    x, w = torch.randn(20, 64), torch.randn(12, 64)
    up, down = torch.randn(12, 3, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    y = torch.randn(20, 12)
    xq, wq = quantize_input_rows(x, INT4), quantize_weight_rows(w, INT4)
    want = (y.double() - (xq @ wq.t() + (x @ down.float()) @ up.float().t()).double()).pow(2).sum()
    assert math.isclose(output_error(y, xq, x, wq, up, down), float(want), rel_tol=1e-6)


def _refine_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k, n = 256, 192
    x = torch.randn(512, k, generator=gen)
    x[:, :4] *= 20  # outlier channels: the branch has something to do
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * k**-0.5
    w[:, :4] *= 8
    return w, x


@pytest.mark.parametrize("spec", [INT4, NVFP4], ids=["int4", "nvfp4"])
def test_refinement_keeps_the_best_iterate_and_stops_at_the_first_increase(spec) -> None:
    w, x = _refine_problem()
    res = refine_lowrank(w, x, spec, RANK, num_iters=100, svd="randomized")
    errs = res.errors
    assert res.error == min(errs) and errs[res.best_iteration] == res.error
    # the iterates the loop accepted never got worse; the only worse one is the last (it triggered the stop)
    accepted = errs[: res.best_iteration + 1]
    assert all(b <= a for a, b in zip(accepted, accepted[1:], strict=False)), errs
    if len(errs) < 100:
        assert len(errs) == res.best_iteration + 2 and errs[-1] > res.error
    assert res.error <= errs[0]
    assert len(errs) > 1, "one iteration only: the refinement never improved on the plain SVD"
    # the kept residual and branch rebuild Ŵ; wq is its quantization
    torch.testing.assert_close(res.residual + res.up @ res.down.t(), w, rtol=F64_RTOL, atol=1e-12)
    assert torch.equal(res.wq, quantize_weight_rows(res.residual, spec))


def test_first_iteration_is_the_plain_svd_of_the_smoothed_weight() -> None:
    w, x = _refine_problem(1)
    res = refine_lowrank(w, x, INT4, RANK, num_iters=1, svd="full")
    up, down = lowrank_svd(w, RANK, "full")
    assert res.iterations == 1 and torch.equal(res.up, up) and torch.equal(res.down, down)
    want = output_error(
        x @ w.float().t(), quantize_input_rows(x, INT4), x, quantize_weight_rows(w - up @ down.t(), INT4), up, down
    )
    assert res.error == want


def test_without_early_stop_all_iterations_run() -> None:
    w, x = _refine_problem(2)
    res = refine_lowrank(w, x, INT4, RANK, num_iters=6, early_stop=False, svd="randomized")
    assert res.iterations == 6 and res.error == min(res.errors)
    with pytest.raises(ValueError, match="num_iters=0"):
        refine_lowrank(w, x, INT4, RANK, num_iters=0)
