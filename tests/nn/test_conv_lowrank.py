"""Low-rank convs (``QConv{1,2,3}dLowRank``, ``QConvTranspose{1,2,3}dLowRank``): the branch is exact in the GEMM view,
smoothing is the layer's own input scale, fake-quant == frozen bit for bit, save/load bit-identical."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vqsuite
from vqsuite.calibrators.svdquant import sqnr_db
from vqsuite.config import QuantSpec, get_preset
from vqsuite.errors import ConfigError
from vqsuite.nn import (
    FLOAT_LOWRANK_CONV_TWINS,
    QConv2d,
    QConv2dLowRank,
    QConvTranspose2d,
    QConvTranspose2dLowRank,
    QConvTransposeNdLowRank,
)

#: relative error of a low-rank conv with quantization off vs the float conv (float32; measured ~3e-7)
FLOAT_REL_TOL = 1e-5
#: SQNR of the branch vs a conv with the GEMM-view product ``proj_up @ proj_down^T`` as weight (float32 rounding
#: only; measured 125-135 dB)
BRANCH_SQNR_DB = 100.0

#: (id, float layer, input spatial size): strides, padding (ints, "same", reflect), dilation, output padding, odd
#: and non-square kernels, 1-D/2-D/3-D
CASES = [
    ("conv2d-s2-p1", lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), 9),
    (
        "conv2d-odd-dil2-reflect",
        lambda: nn.Conv2d(8, 12, (3, 5), padding=(2, 4), dilation=2, padding_mode="reflect"),
        9,
    ),
    ("conv2d-same", lambda: nn.Conv2d(8, 12, 5, padding="same"), 7),
    ("conv2d-1x1", lambda: nn.Conv2d(8, 12, 1, bias=False), 5),
    ("conv1d", lambda: nn.Conv1d(8, 12, 3, stride=2, padding=1), 11),
    ("conv3d", lambda: nn.Conv3d(4, 8, 3, padding=1, stride=(1, 2, 1)), 5),
    ("convt2d-s2-op1", lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1), 5),
    ("convt2d-odd-dil", lambda: nn.ConvTranspose2d(8, 6, (3, 2), stride=(2, 3), dilation=(2, 1)), 5),
    ("convt2d-k4-s2", lambda: nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, bias=False), 5),
    ("convt1d", lambda: nn.ConvTranspose1d(8, 6, 3, stride=2), 7),
    ("convt3d", lambda: nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1), 4),
]
IDS = [c[0] for c in CASES]


def _build(make, size: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    m = make().eval()
    x = torch.randn(2, m.in_channels, *([size] * (m.weight.ndim - 2)))
    return m, x


def _lowrank(m: nn.Module, spec: QuantSpec, smooth: torch.Tensor | None = None):
    return FLOAT_LOWRANK_CONV_TWINS[type(m)].from_float(m, spec, smooth)


@pytest.mark.parametrize(("case", "make", "size"), CASES, ids=IDS)
def test_unquantized_lowrank_conv_equals_the_float_conv(case: str, make, size: int) -> None:
    m, x = _build(make, size)
    smooth = torch.rand(m.in_channels, generator=torch.Generator().manual_seed(1)) * 3 + 0.25
    q = _lowrank(m, QuantSpec(weight=None, act=None, rank=3), smooth)
    assert q.rank == 3 and q.smooth.shape == (m.in_channels,)
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) <= FLOAT_REL_TOL
    # the split is exact in the GEMM view: W·diag(λ) = proj_up @ proj_down^T + R
    w = q._to_gemm(m.weight).double() * q.gemm_smooth().double()
    split = q._to_gemm(q.__dict__["_parameters"]["weight"]).double() + q.proj_up.double() @ q.proj_down.double().t()
    assert torch.allclose(split, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("case", "make", "size"), CASES, ids=IDS)
def test_branch_is_the_gemm_view_product(case: str, make, size: int) -> None:
    m, x = _build(make, size)
    q = _lowrank(m, QuantSpec(weight=None, act=None, rank=4))
    w_branch = q._from_gemm(q.proj_up.detach() @ q.proj_down.detach().t())
    with torch.no_grad():
        if isinstance(q, QConvTransposeNdLowRank):
            fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[q.dims]
            ref = fn(x, w_branch, None, q.stride, q.padding, q.output_padding, 1, q.dilation)
            got = q.branch(x, q.output_padding)
        else:
            ref = q._conv(x, w_branch, None, 1)
            got = q.branch(x)
    assert sqnr_db(ref, got) >= BRANCH_SQNR_DB


#: INT4 per-channel weights, INT8 per-token activations (fits the 8-channel cases)
W4A8 = QuantSpec(weight="int4", weight_group_size=None, act="int8", act_mode="dynamic_per_token", rank=4)


@pytest.mark.parametrize(("case", "make", "size"), CASES, ids=IDS)
def test_fake_quant_and_frozen_forward_are_bit_identical(case: str, make, size: int) -> None:
    m, x = _build(make, size)
    smooth = torch.rand(m.in_channels, generator=torch.Generator().manual_seed(2)) + 0.5
    q = _lowrank(m, W4A8, smooth)
    with torch.no_grad():
        fake = q(x)
        q.freeze()
        frozen = q(x)
    assert torch.equal(fake, frozen)
    assert "weight" not in q._parameters and q.qweight.dtype == torch.uint8 and q.proj_down is not None


def test_w4a4_frozen_equals_fake_quant() -> None:
    """The svdquant-int4 recipe (INT4 g16 weights and activations on 32 channels)."""
    torch.manual_seed(0)
    spec = get_preset("svdquant-int4").default.replace(rank=8, weight_group_size=16, act_group_size=16)
    for m in (nn.Conv2d(32, 32, 3, padding=1), nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)):
        x = torch.randn(2, 32, 8, 8)
        q = _lowrank(m, spec, torch.rand(32) + 0.5)
        plain = (QConv2d if isinstance(m, nn.Conv2d) else QConvTranspose2d).from_float(m, spec.replace(rank=0))
        with torch.no_grad():
            ref, fake = m(x), q(x)
            q.freeze()
            frozen = q(x)
        assert torch.equal(fake, frozen)
        assert sqnr_db(ref, fake) > 0.5 * sqnr_db(ref, plain(x).detach())  # a sane W4A4 layer, not garbage


def test_output_size_and_unbatched_inputs() -> None:
    m, x = _build(lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1), 5)
    q = _lowrank(m, QuantSpec(weight=None, act=None, rank=2))
    with torch.no_grad():
        ref = m(x, output_size=[10, 10])
        assert ref.shape[-2:] == (10, 10)
        assert float((q(x, output_size=[10, 10]) - ref).norm() / ref.norm()) <= FLOAT_REL_TOL
        assert float((q(x[0]) - m(x[0])).norm() / m(x[0]).norm()) <= FLOAT_REL_TOL
    c, xc = _build(lambda: nn.Conv2d(8, 6, 3), 6)
    qc = _lowrank(c, QuantSpec(weight=None, act=None, rank=2))
    with torch.no_grad():
        assert float((qc(xc[0]) - c(xc[0])).norm() / c(xc[0]).norm()) <= FLOAT_REL_TOL


def test_grouped_conv_and_too_large_rank_are_refused() -> None:
    with pytest.raises(ConfigError, match="groups=2"):
        QConv2dLowRank(8, 8, 3, groups=2, spec=QuantSpec(rank=2))
    with pytest.raises(ConfigError, match=r"rank=9 must lie in \[0, min\(N, K\)=8\]"):
        QConv2dLowRank(4, 8, 3, spec=QuantSpec(rank=9))
    with pytest.raises(ValueError, match="smooth must be finite, positive"):
        _lowrank(nn.Conv2d(4, 8, 3), QuantSpec(rank=2), -torch.ones(4))


def test_quantize_model_save_load_is_bit_identical(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
    ).eval()
    x = torch.randn(2, 16, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the data-free warning
        q = vqsuite.quantize_model(copy.deepcopy(model), "svdquant-int4")
    assert isinstance(q[0], QConv2dLowRank) and isinstance(q[2], QConvTranspose2dLowRank)
    assert q[0].rank == q[2].rank == 8  # useful rank of GEMM [32, 144] and [256, 32]: min(N, K) / 4
    rows = {e.name: e.reason for e in q.vqsuite_report.layers}
    assert "conv low-rank rank 8" in rows["0"] and "conv low-rank rank 8" in rows["2"]
    with torch.no_grad():
        y = q(x)
    vqsuite.save_quantized(q, tmp_path)
    loaded = vqsuite.load_quantized(tmp_path, model=copy.deepcopy(model))
    assert type(loaded[0]) is QConv2dLowRank and loaded[0].rank == 8
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    for name, t in q.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
