"""SVDQuant on convolutions: GEMM-view calibration rows, the Linear calibrator on them (λ tied per input channel,
activations quantized per pixel), and ``quantize_model``'s conv branches and report notes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vqsuite
from vqsuite.calibrators.capture import capture_inputs
from vqsuite.calibrators.svdquant import (
    SVDQuantOptions,
    conv_capture_transform,
    conv_gemm_rows,
    conv_gemm_weight,
    sqnr_db,
    svdquant_group,
)
from vqsuite.config import get_preset
from vqsuite.nn import QConv2d, QConv2dLowRank, QConvTranspose2d, QConvTranspose2dLowRank

#: the GEMM rows times the GEMM weight reproduce the float conv (float64: rounding only)
ROWS_ATOL = 1e-10
#: held-out output SQNR gain of calibrated SVDQuant over plain W4A4 RTN on a conv whose input has 10x outlier
#: channels (measured +6.6 dB for Conv2d 64->64 3x3, +7.2 dB for ConvTranspose2d 64->32 k4 s2, seed 0)
OUTLIER_GAIN_DB = 3.0
#: the calibration objective is the layer's own math: its SQNR on the calibration rows and the layer's held-out
#: SQNR on fresh inputs of the same distribution agree (measured within 0.3 dB)
CALIB_VS_LAYER_DB = 1.5
OPTS = SVDQuantOptions(fast=True, lowrank_iters=4)

CONVS = [
    ("s2-p1", lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1)),
    ("odd-dil-reflect", lambda: nn.Conv2d(6, 5, (3, 5), padding=(2, 1), dilation=2, padding_mode="reflect")),
    ("same", lambda: nn.Conv2d(6, 5, 4, padding="same", dilation=2)),
    ("1d", lambda: nn.Conv1d(6, 5, 3, stride=2, padding=1)),
    ("3d", lambda: nn.Conv3d(4, 5, 3, padding=1, stride=(1, 2, 1))),
]
CONV_TS = [
    ("s2-op1", lambda: nn.ConvTranspose2d(6, 5, 3, stride=2, padding=1, output_padding=1)),
    ("odd-dil", lambda: nn.ConvTranspose2d(6, 5, (3, 2), stride=(2, 3), dilation=(1, 2))),
]


@pytest.mark.parametrize("make", [c[1] for c in CONVS], ids=[c[0] for c in CONVS])
def test_im2col_rows_reproduce_the_conv(make) -> None:
    torch.manual_seed(0)
    m = make().double()
    x = torch.randn(2, m.in_channels, *([9] * (m.weight.ndim - 2)), dtype=torch.float64)
    ref = (m(x) - m.bias.view(-1, *([1] * (m.weight.ndim - 2)))).movedim(1, -1).reshape(-1, m.out_channels)
    rows = conv_gemm_rows(m, x)
    assert torch.allclose(rows @ conv_gemm_weight(m).t(), ref, atol=ROWS_ATOL, rtol=0)
    sub = conv_gemm_rows(m, x, max_rows=7, seed=3)  # a subset of the very rows, chosen before unfolding
    assert sub.shape == (7, rows.shape[1])
    assert all(bool((rows == r).all(dim=1).any()) for r in sub)


@pytest.mark.parametrize("make", [c[1] for c in CONV_TS], ids=[c[0] for c in CONV_TS])
def test_transposed_conv_rows_fold_back_to_the_output(make) -> None:
    """A transposed conv's GEMM rows are its input pixels: col2im (``F.fold``) of ``rows @ W^T`` is the output."""
    torch.manual_seed(0)
    m = make().double()
    x = torch.randn(2, m.in_channels, 5, 4, dtype=torch.float64)
    ref = m(x) - m.bias.view(-1, 1, 1)
    cols = (conv_gemm_rows(m, x) @ conv_gemm_weight(m).t()).reshape(2, 20, -1).transpose(1, 2)
    out = F.fold(cols, ref.shape[-2:], m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    assert torch.allclose(out, ref, atol=ROWS_ATOL, rtol=0)


def _outlier_input(n: int, channels: int, gen: torch.Generator, scale: torch.Tensor) -> torch.Tensor:
    return torch.randn(n, channels, 10, 10, generator=gen) * scale


@pytest.mark.parametrize(
    "make",
    [lambda: nn.Conv2d(64, 64, 3, padding=1), lambda: nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)],
    ids=["conv2d", "convt2d"],
)
def test_calibrated_conv_beats_plain_rtn_on_outlier_channels(make) -> None:
    torch.manual_seed(0)
    m = make().eval()
    gen = torch.Generator().manual_seed(1)
    scale = (1 + 9 * (torch.rand(64, generator=gen) > 0.9).float()).view(1, -1, 1, 1)
    spec = get_preset("svdquant-int4").default.replace(rank=8)
    with torch.no_grad(), capture_inputs({"c": m}, transform=conv_capture_transform({"c": m})) as stats:
        m(_outlier_input(8, 64, gen, scale))
    (q,) = svdquant_group([m], stats["c"], spec, OPTS)
    assert isinstance(q, QConv2dLowRank | QConvTranspose2dLowRank) and q.rank == 8
    assert q.smooth.shape == (64,)  # λ per input channel, tied over the taps in the GEMM view
    assert not torch.equal(q.smooth, torch.ones(64))
    x = _outlier_input(4, 64, gen, scale)
    plain = (QConv2d if isinstance(m, nn.Conv2d) else QConvTranspose2d).from_float(m, spec.replace(rank=0)).freeze()
    with torch.no_grad():
        ref, fake = m(x), q(x)
        frozen = q.freeze()(x)
        plain_db = sqnr_db(ref, plain(x))
    assert torch.equal(fake, frozen)
    got_db = sqnr_db(ref, fake)
    assert got_db >= plain_db + OUTLIER_GAIN_DB, (got_db, plain_db)
    assert abs(q.svdquant_info["sqnr_db"] - got_db) <= CALIB_VS_LAYER_DB, (q.svdquant_info["sqnr_db"], got_db)


class _Net(nn.Module):
    """A 3x3 conv, a grouped conv, a transposed conv and a 1x1 head: ``x [B, 16, 8, 8] -> [B, 8, 16, 16]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 64, 3, padding=1)
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.up = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
        self.head = nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(F.relu(self.grouped(F.relu(self.conv(x))))))


def test_quantize_model_gives_convs_calibrated_branches(tmp_path) -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    calib = [torch.randn(4, 16, 8, 8) for _ in range(2)]
    cfg = get_preset("svdquant-int4").with_overrides(method_options={"fast": True, "lowrank_iters": 4})
    q = vqsuite.quantize_model(copy.deepcopy(model), cfg, calib_data=calib)
    rows = {e.name: e for e in q.vqsuite_report.layers}
    assert q.vqsuite_report.skipped == []
    # GEMM [64, 144] and [512, 64]: useful rank min(N, K) / 4 = 16; the head [8, 32] is too narrow (rank 0)
    assert isinstance(q.conv, QConv2dLowRank) and q.conv.rank == 16
    assert isinstance(q.up, QConvTranspose2dLowRank) and q.up.rank == 16
    assert rows["conv"].reason.startswith("conv svdquant rank 16") and "conv low-rank rank 16" in rows["conv"].reason
    assert "conv low-rank rank 16" in rows["up"].reason
    assert type(q.grouped) is QConv2d and "conv: no low-rank branch (groups=4; rank 0)" in rows["grouped"].reason
    assert q.head.rank == 0 and "conv low-rank rank 0" in rows["head"].reason  # smoothing-only SVDQuant
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        y = q(x)
    vqsuite.save_quantized(q, tmp_path)
    loaded = vqsuite.load_quantized(tmp_path, model=copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_without_the_rank_fallback_a_too_narrow_conv_is_skipped() -> None:
    model = nn.Sequential(nn.Conv2d(64, 8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vqsuite.quantize_model(model, "svdquant-int4", rank_fallback=False)
    (row,) = model.vqsuite_report.skipped
    assert row.reason == "rank=32 exceeds min(N, K)=8 of the conv's GEMM view [8, 64]"
