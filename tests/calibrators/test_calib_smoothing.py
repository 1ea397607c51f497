"""SVDQuant smoothing: the deepcompressor (α, β) grid, λ = max|X|^α / max|W|^β with its sanitation, the group
weight span, and the validated SVDQuant options."""

from __future__ import annotations

import pytest
import torch

from vqsuite.calibrators.smoothing import smooth_factors, smoothing_grid, weight_column_absmax
from vqsuite.calibrators.svdquant import SVDQuantOptions

#: float64 formula check
LAMBDA_RTOL = 1e-12


def test_default_grid_has_the_39_deepcompressor_candidates() -> None:
    grid = smoothing_grid()
    assert len(grid) == 39
    assert grid[0] == (0.0, 0.0)
    assert grid[1:20] == [(i / 20, 0.0) for i in range(1, 20)]
    assert grid[20:] == [(i / 20, 1 - i / 20) for i in range(1, 20)]
    assert len(set(grid)) == 39


@pytest.mark.parametrize("n, expected", [(10, 19), (20, 39), (1, 1), (2, 3)], ids=["fast", "default", "n1", "n2"])
def test_grid_size_is_2n_minus_1(n: int, expected: int) -> None:
    assert len(smoothing_grid(n)) == expected


@pytest.mark.parametrize("bad", [0, -3, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_bad_grid_size_is_rejected(bad) -> None:
    with pytest.raises(ValueError, match="num_grids="):
        smoothing_grid(bad)


def test_smooth_factors_follow_the_formula() -> None:
    x = torch.tensor([1.0, 4.0, 9.0, 0.5], dtype=torch.float64)
    w = torch.tensor([0.25, 1.0, 2.0, 0.1], dtype=torch.float64)
    lam = smooth_factors(x, w, 0.5, 0.5)
    assert lam.dtype == torch.float64
    torch.testing.assert_close(lam, x.sqrt() / w.sqrt(), rtol=LAMBDA_RTOL, atol=0)
    torch.testing.assert_close(smooth_factors(x, w, 0.3, 0.0), x.pow(0.3), rtol=LAMBDA_RTOL, atol=0)
    assert torch.equal(smooth_factors(x, w, 0.0, 0.0), torch.ones(4, dtype=torch.float64))


def test_zero_lambda_becomes_one() -> None:
    """A channel that never fired (max|x| = 0) gets λ = 1, the others keep theirs."""
    x = torch.tensor([0.0, 4.0, 9.0])
    w = torch.tensor([1.0, 1.0, 1.0])
    lam = smooth_factors(x, w, 0.5, 0.0)
    assert lam.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "x, w, alpha, beta",
    [
        ([1.0, 2.0, 3.0], [1.0, 0.0, 2.0], 0.5, 0.5),  # a dead weight column divides by zero
        ([1.0, float("nan"), 3.0], [1.0, 1.0, 1.0], 0.5, 0.0),
        ([1.0, float("inf"), 3.0], [1.0, 1.0, 1.0], 0.5, 0.5),
    ],
    ids=["dead-weight-column", "nan-activation", "inf-activation"],
)
def test_any_non_finite_lambda_falls_back_to_all_ones(x, w, alpha, beta) -> None:
    lam = smooth_factors(torch.tensor(x), torch.tensor(w), alpha, beta)
    assert torch.equal(lam, torch.ones(3, dtype=torch.float64))


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="must be equal"):
        smooth_factors(torch.ones(3), torch.ones(4), 0.5, 0.5)
    with pytest.raises(ValueError, match="must lie in"):
        smooth_factors(torch.ones(3), torch.ones(3), 1.5, 0.0)


def test_group_weight_span_is_the_max_over_the_group() -> None:
    q = torch.tensor([[1.0, -5.0], [2.0, 0.5]])
    k = torch.tensor([[-3.0, 1.0]])
    v = torch.tensor([[0.5, 0.25], [0.0, -6.0], [1.0, 1.0]])
    assert weight_column_absmax([q, k, v]).tolist() == [3.0, 6.0]
    with pytest.raises(ValueError, match="every weight must be"):
        weight_column_absmax([q, torch.ones(2, 3)])


def test_options_fast_grid_and_validation() -> None:
    assert len(SVDQuantOptions().grid) == 39
    assert len(SVDQuantOptions(fast=True).grid) == 19
    assert SVDQuantOptions.from_dict({"num_grids": 10, "gptq": True}).gptq
    with pytest.raises(ValueError, match="unknown SVDQuant option.*num_grid\\b"):
        SVDQuantOptions.from_dict({"num_grid": 10})
    for bad in ({"num_grids": 0}, {"svd": "lanczos"}, {"gptq": "yes"}, {"gptq_damp": -1.0}, {"reservoir": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SVDQuantOptions(**bad)
