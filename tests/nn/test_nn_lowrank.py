"""QLinearLowRank: the SVD split reconstructs the float weight, the branch is the best rank-r approximation,
fake-quant == frozen bit for bit, the 16-bit branch absorbs low-rank outliers, smoothing is exact algebra."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vqsuite.config import QuantSpec, get_preset
from vqsuite.nn import QLinear, QLinearLowRank, lowrank_factors

K, N, RANK = 128, 96, 8
#: float32 reconstruction of W from (R + up @ down^T) / λ
RECON_ATOL = 1e-5
#: the branch must cut the output MSE of a weight with a strong rank-RANK component at least this much
LOWRANK_MIN_ERROR_GAIN = 10.0  # measured 28-33x on 3 seeds

LOWRANK_SPECS = {
    "w4a8-r8": QuantSpec(weight="int4", weight_group_size=64, act="int8", act_mode="dynamic_per_token", rank=RANK),
    "w4a4-r8": get_preset("w4a4").default.replace(rank=RANK),
    "nvfp4-r8": get_preset("nvfp4").default.replace(rank=RANK),
    "mxfp4-r8": get_preset("mxfp4").default.replace(rank=RANK),
    "fp8-r8": get_preset("w8a8-fp8").default.replace(rank=RANK),
    "w8a8-r0": get_preset("w8a8").default,
}


def _linear(seed: int = 0, outlier_scale: float = 0.0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        w = torch.randn(N, K, generator=gen) * K**-0.5
        if outlier_scale:
            w += outlier_scale * (torch.randn(N, RANK, generator=gen) @ torch.randn(RANK, K, generator=gen)) / K
        lin.weight.copy_(w)
        lin.bias.normal_(0, 0.1, generator=gen)
    return lin


def _smooth(seed: int = 0) -> torch.Tensor:
    return torch.rand(K, generator=torch.Generator().manual_seed(seed)) * 3 + 0.25


@pytest.mark.parametrize("with_smooth", [False, True], ids=["no-smooth", "smooth"])
def test_split_reconstructs_the_float_weight(with_smooth: bool) -> None:
    lin = _linear()
    smooth = _smooth() if with_smooth else None
    q = QLinearLowRank.from_float(lin, LOWRANK_SPECS["w4a8-r8"], smooth=smooth)
    assert q.rank == RANK and q.proj_down.shape == (K, RANK) and q.proj_up.shape == (N, RANK)
    assert torch.allclose(q.float_weight(), lin.weight, atol=RECON_ATOL)
    lam = torch.ones(K) if smooth is None else smooth
    assert torch.allclose(q.smooth, lam)
    # the residual is orthogonal to the branch: what remains is the tail of the singular values
    s = torch.linalg.svdvals((lin.weight.detach() * lam).double())
    residual = q.__dict__["_parameters"]["weight"].double()
    assert torch.allclose(torch.linalg.norm(residual), s[RANK:].pow(2).sum().sqrt(), rtol=1e-5)


def test_lowrank_factors_are_the_best_rank_r_approximation() -> None:
    w = torch.randn(40, 30, dtype=torch.float64)
    up, down = lowrank_factors(w, 5)
    assert up.shape == (40, 5) and down.shape == (30, 5)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(up @ down.t(), (u[:, :5] * s[:5]) @ vh[:5])
    assert torch.allclose(torch.linalg.norm(w - up @ down.t()), s[5:].pow(2).sum().sqrt())


@pytest.mark.parametrize("with_smooth", [False, True], ids=["no-smooth", "smooth"])
@pytest.mark.parametrize("name", list(LOWRANK_SPECS))
def test_fake_quant_equals_frozen_bit_for_bit(name: str, with_smooth: bool) -> None:
    q = QLinearLowRank.from_float(_linear(), LOWRANK_SPECS[name], smooth=_smooth() if with_smooth else None)
    x = torch.randn(3, 7, K)
    y_fake = q(x)
    q.freeze()
    y_frozen = q(x)
    assert y_frozen.shape == (3, 7, N)
    assert torch.equal(y_fake, y_frozen)


def test_frozen_keeps_the_branch_in_16_bit_and_drops_the_residual() -> None:
    q = QLinearLowRank.from_float(_linear(), LOWRANK_SPECS["w4a8-r8"]).freeze()
    params = dict(q.named_parameters())
    assert set(params) == {"bias", "proj_down", "proj_up"}
    assert set(dict(q.named_buffers())) == {"smooth", "qweight", "wscales"}
    assert q.qweight.shape == (N, K // 2)
    with pytest.raises(RuntimeError, match="frozen"):
        q.set_smoothing_and_lowrank()


def test_branch_absorbs_low_rank_outliers() -> None:
    lin = _linear(outlier_scale=20.0)
    x = torch.randn(64, K)
    ref = lin(x)
    spec = LOWRANK_SPECS["w4a8-r8"]
    plain = QLinear.from_float(lin, spec.replace(rank=0)).freeze()
    lowrank = QLinearLowRank.from_float(lin, spec).freeze()
    err_plain = (plain(x) - ref).pow(2).mean()
    err_lowrank = (lowrank(x) - ref).pow(2).mean()
    assert err_plain / err_lowrank >= LOWRANK_MIN_ERROR_GAIN, f"{err_plain:.3e} vs {err_lowrank:.3e}"


def test_branch_only_spec_with_smoothing_is_the_float_layer() -> None:
    """weight=None, act=None, rank>0: nothing is quantized, so (x/λ)(R + UD^T)^T must give x W^T."""
    lin = _linear()
    q = QLinearLowRank.from_float(lin, QuantSpec(weight=None, rank=RANK), smooth=_smooth())
    x = torch.randn(5, K)
    assert torch.allclose(q(x), lin(x), atol=1e-5)
    assert torch.allclose(q.freeze()(x), lin(x), atol=1e-5)


def test_smoothing_is_applied_before_activation_quantization() -> None:
    """λ changes the quantized result (it moves range from activations into weights) but not the float one."""
    lin = _linear()
    spec = LOWRANK_SPECS["w4a8-r8"]
    x = torch.randn(16, K)
    a = QLinearLowRank.from_float(lin, spec).freeze()(x)
    b = QLinearLowRank.from_float(lin, spec, smooth=_smooth()).freeze()(x)
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(
    "smooth, needle",
    [
        (torch.zeros(K), "positive"),
        (torch.full((K,), float("nan")), "finite"),
        (torch.ones(K + 1), f"shape ({K},)"),
    ],
    ids=["zero", "nan", "wrong-shape"],
)
def test_bad_smoothing_is_rejected(smooth: torch.Tensor, needle: str) -> None:
    with pytest.raises(ValueError, match="smooth must be") as err:
        QLinearLowRank.from_float(_linear(), LOWRANK_SPECS["w4a8-r8"], smooth=smooth)
    assert needle in str(err.value)


@pytest.mark.parametrize("rank", [-1, min(K, N) + 1], ids=["negative", "too-large"])
def test_rank_out_of_range_is_rejected(rank: int) -> None:
    with pytest.raises(ValueError, match=f"rank={rank} must lie in"):
        QLinearLowRank(K, N, spec=QuantSpec(weight="int8"), rank=rank)


def test_gradients_reach_the_branch_and_the_residual() -> None:
    q = QLinearLowRank.from_float(_linear(), LOWRANK_SPECS["w4a4-r8"])
    x = torch.randn(4, K, requires_grad=True)
    q(x).sum().backward()
    for p in (q.weight, q.proj_down, q.proj_up, q.bias, x):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_rank_zero_is_a_smoothed_qlinear() -> None:
    lin = _linear()
    spec = get_preset("w8a8").default
    x = torch.randn(6, K)
    lr = QLinearLowRank.from_float(lin, spec).freeze()
    assert lr.proj_down is None and lr.proj_up is None
    assert torch.equal(lr(x), QLinear.from_float(lin, spec).freeze()(x))
