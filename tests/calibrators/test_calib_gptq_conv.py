"""GPTQ on convolutions: the GEMM rows of every conv kind reproduce the float output, the streamed Hessian is the
direct ``2/M X^T X`` (and, for a transposed conv, exactly the Hessian of the folded output error), the fast row
paths (``F.unfold``, transposed-conv phase blocks) equal the identity-kernel twin, and GPTQ beats round-to-nearest
on the layer's output error with outlier channels; the QTensor it returns is what the quantized layer stores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqsuite.calibrators.gptq import (
    StreamingHessian,
    gemm_rows,
    gptq_layer,
    gptq_quantize,
    gptq_quantize_grouped,
    hessian_width,
    weight_from_gemm,
    weight_view,
)
from vqsuite.config import QuantSpec
from vqsuite.formats import dequantize, quantize
from vqsuite.nn import CONV_TWINS, FLOAT_CONV_TRANSPOSE_TYPES, SamePadConv2d

#: float64 identities (rows reproduce the output, Hessians agree): relative error bound
EXACT_RTOL = 1e-10
#: the quadratic form uses the float32 GPTQ view of the weight change: relative error bound
QUAD_RTOL = 1e-6
#: GPTQ must cut the held-out output error of RTN by at least this factor on inputs with outlier channels
#: (measured 1.26x-1.65x across the layers, formats and scale modes below)
CONV_GPTQ_MIN_GAIN = 1.15
#: calibration samples of the GPTQ cases (fewer over-fit the Hessian: K' = 512 columns)
CALIB_SAMPLES = 48

LAYERS = {
    "conv2d-grouped-stride2": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2), (2, 8, 9, 9)),
    "conv2d-depthwise-reflect": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="reflect"), (2, 6, 7, 7)),
    "conv2d-same-string": (lambda: nn.Conv2d(6, 6, 3, padding="same", groups=3), (2, 6, 7, 7)),
    "conv2d-tf-same": (lambda: SamePadConv2d(4, 6, 3, stride=2), (2, 4, 9, 8)),
    "conv1d-dilated": (lambda: nn.Conv1d(4, 6, 5, dilation=2), (3, 4, 20)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (2, 3, 3), padding=1), (2, 2, 4, 5, 5)),
    "convT2d-grouped-s2": (lambda: nn.ConvTranspose2d(6, 8, 4, stride=2, padding=1, groups=2), (2, 6, 5, 5)),
    "convT2d-1x1-input": (lambda: nn.ConvTranspose2d(6, 8, 4, stride=1, padding=0), (3, 6, 1, 1)),
    "convT2d-uneven": (
        lambda: nn.ConvTranspose2d(6, 8, (3, 5), stride=(3, 2), padding=(1, 2), dilation=(2, 1)),
        (2, 6, 4, 5),
    ),
    "convT1d-outpad": (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=3, padding=1, output_padding=2, dilation=2),
        (2, 4, 7),
    ),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 4, 3, stride=2, padding=1), (1, 2, 3, 4, 3)),
}


def _layer(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    make, shape = LAYERS[name]
    torch.manual_seed(seed)
    return make().double().eval(), torch.randn(shape, dtype=torch.float64)


def _unbiased(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    return y if layer.bias is None else y - layer.bias.view(1, -1, *([1] * (y.ndim - 2)))


def _fold_rows_output(rows_out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[g, B·L, O/g]`` (one row per output pixel) -> ``[B, O, *spatial]``."""
    g, b = rows_out.shape[0], y.shape[0]
    return rows_out.reshape(g, b, -1, rows_out.shape[-1]).permute(1, 0, 3, 2).reshape(y.shape)


@pytest.mark.parametrize("name", list(LAYERS))
def test_gemm_rows_reproduce_the_float_output(name: str) -> None:
    layer, x = _layer(name)
    y = _unbiased(layer, x)
    rows = gemm_rows(layer, x, tuple(y.shape))
    assert rows.shape[0] == hessian_width(layer)[0] and rows.shape[2] == hessian_width(layer)[1]
    got = _fold_rows_output(rows @ weight_view(layer).double().transpose(1, 2), y)
    torch.testing.assert_close(got, y, rtol=EXACT_RTOL, atol=EXACT_RTOL)


@pytest.mark.parametrize("name", list(LAYERS))
def test_streamed_hessian_is_the_output_error_hessian(name: str) -> None:
    """``vec(ΔW) H vec(ΔW)`` summed over output channels is ``2/M ||Δy||²`` for any weight change ΔW (exact for
    convs and, through the fold, for transposed convs); the fast rows give the twin's Hessian; chunking and
    several calls sum like one call."""
    layer, x = _layer(name)
    y = layer(x)
    fast, ref = StreamingHessian(layer), StreamingHessian(layer, fast=False)
    for part in (x[:1], x[1:]):  # two calls
        fast.add(part, (part.shape[0], *y.shape[1:]))
        ref.add(part, (part.shape[0], *y.shape[1:]))
    torch.testing.assert_close(fast.hessian(), ref.hessian(), rtol=EXACT_RTOL, atol=EXACT_RTOL)
    rows = gemm_rows(layer, x, tuple(y.shape))
    direct = 2.0 / rows.shape[1] * rows.transpose(1, 2) @ rows
    torch.testing.assert_close(ref.hessian(), direct, rtol=EXACT_RTOL, atol=EXACT_RTOL)
    torch.manual_seed(1)
    delta = torch.randn_like(layer.weight)
    moved = type(layer)(**_ctor(layer)).double()
    moved.load_state_dict({"weight": layer.weight + delta, **({"bias": layer.bias} if layer.bias is not None else {})})
    dy = moved(x) - y
    dv = weight_view(moved).double() - weight_view(layer).double()  # [g, O/g, K']
    quad = torch.einsum("gok,gkl,gol->", dv, fast.hessian(), dv)
    m = fast.rows
    torch.testing.assert_close(quad, 2.0 / m * dy.pow(2).sum(), rtol=QUAD_RTOL, atol=0.0)


def _ctor(layer: nn.Module) -> dict:
    kw = {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": layer.kernel_size,
        "stride": layer.stride,
        "padding": layer.padding,
        "dilation": layer.dilation,
        "groups": layer.groups,
        "bias": layer.bias is not None,
    }
    if isinstance(layer, FLOAT_CONV_TRANSPOSE_TYPES):
        kw["output_padding"] = layer.output_padding
    else:
        kw["padding_mode"] = layer.padding_mode
    return kw


def test_conv_hessian_equals_unfold_gram_on_a_plain_conv() -> None:
    """The textbook im2col: ``F.unfold`` columns of a dense conv, ``2/M X^T X`` in float64."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    x = torch.randn(4, 3, 11, 11, dtype=torch.float64)
    cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
    acc = StreamingHessian(layer, fast=False)
    acc.add(x)
    torch.testing.assert_close(acc.hessian()[0], 2.0 / cols.shape[0] * cols.T @ cols, rtol=EXACT_RTOL, atol=0.0)


def _outlier_inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Inputs with correlated channels, a few of them 10x larger, and neighbouring pixels correlated (what conv
    activations look like); the channel mix is the same for every seed (calibration and held-out data share a
    distribution)."""
    c = shape[1]
    mix = torch.eye(c) + 0.5 * torch.randn(c, c, generator=torch.Generator().manual_seed(0)) / c**0.5
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = torch.einsum("bc...,cd->bd...", x, mix)
    x = x + F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False) * 2.0  # spatial correlation
    gain = torch.ones(c)
    gain[:: max(1, c // 4)] = 10.0
    return x * gain.view(1, c, *([1] * (len(shape) - 2)))


GPTQ_CASES = {
    "conv3x3-int4-g16": (
        lambda: nn.Conv2d(16, 32, 3, padding=1),
        (8, 16, 10, 10),
        QuantSpec(weight="int4", weight_group_size=16),
    ),
    "conv-grouped-int4asym-g16": (
        lambda: nn.Conv2d(32, 32, 3, padding=1, groups=2),
        (8, 32, 8, 8),
        QuantSpec(weight="int4_asym", weight_group_size=16),
    ),
    "depthwise-4x4-int4": (
        lambda: nn.Conv2d(16, 16, 4, padding=2, groups=16),
        (8, 16, 12, 12),
        QuantSpec(weight="int4"),
    ),
    "convT-s2-int4-g16": (
        lambda: nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
        (8, 32, 6, 6),
        QuantSpec(weight="int4", weight_group_size=16),
    ),
    "convT-int4asym-channel": (
        lambda: nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1),
        (8, 16, 6, 6),
        QuantSpec(weight="int4_asym"),
    ),
}


@pytest.mark.parametrize("scale_mode", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(GPTQ_CASES))
def test_conv_gptq_beats_rtn_and_is_what_the_layer_stores(name: str, scale_mode: str) -> None:
    make, shape, spec = GPTQ_CASES[name]
    torch.manual_seed(0)
    layer = make().eval()
    x_cal, x_test = _outlier_inputs((CALIB_SAMPLES, *shape[1:]), 1), _outlier_inputs(shape, 2)
    with torch.no_grad():
        y_cal = layer(x_cal)
        y_test = layer(x_test)
    acc = StreamingHessian(layer)
    acc.add(x_cal, tuple(y_cal.shape))
    qt = gptq_layer(layer, acc.hessian(), spec, scale_mode=scale_mode)
    q = CONV_TWINS[type(layer)].from_float(layer, spec)
    assert tuple(qt.codes.shape) == q.gemm_shape and qt.group_size == spec.weight_group_size
    rtn = dequantize(quantize(q._to_gemm(layer.weight.detach()), spec.weight, group_size=spec.weight_group_size))
    with torch.no_grad():
        w_gptq = weight_from_gemm(layer, dequantize(qt))
        w_rtn = weight_from_gemm(layer, rtn)
        conv = type(layer)(**_ctor(layer))
        errs = []
        for w in (w_gptq, w_rtn):
            conv.load_state_dict({"weight": w, "bias": layer.bias})
            errs.append(float((conv(x_test) - y_test).double().pow(2).sum()))
    assert errs[1] / errs[0] >= CONV_GPTQ_MIN_GAIN, f"{name}/{scale_mode}: RTN {errs[1]:.4g} vs GPTQ {errs[0]:.4g}"
    # the quantized layer adopts the codes; its fake-quant and frozen outputs are the GPTQ weight's, bit for bit
    q.set_pending_qtensor(qt)
    with torch.no_grad():
        fake = q(x_test)
        conv.load_state_dict({"weight": w_gptq, "bias": layer.bias})
        torch.testing.assert_close(fake, conv(x_test), rtol=1e-5, atol=1e-5)
        q.freeze()
        assert torch.equal(q(x_test), fake)
        stored = q.stored_qtensor()
    assert torch.equal(stored.codes, qt.codes) and torch.equal(stored.scales, qt.scales)
    if qt.zero_points is not None:
        assert torch.equal(stored.zero_points, qt.zero_points)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(weight="int4", weight_group_size=16), QuantSpec(weight="int8"), QuantSpec(weight="int4_asym")],
    ids=["int4-g16", "int8-channel", "int4-asym-channel"],
)
def test_grouped_sweep_equals_gptq_per_group(spec: QuantSpec) -> None:
    """All conv groups swept at once give each group's own GPTQ codes (dynamic scales, natural order)."""
    gen = torch.Generator().manual_seed(0)
    g, o_g, k = 6, 4, 32
    w = torch.randn(g, o_g, k, generator=gen)
    x = torch.randn(g, 256, k, generator=gen) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=gen))
    h = 2.0 / 256 * x.transpose(1, 2) @ x
    together = gptq_quantize_grouped(w, h, spec, block_size=8)
    for j in range(g):
        alone = gptq_quantize(w[j], h[j], spec, block_size=8)
        rows = slice(j * o_g, (j + 1) * o_g)
        assert torch.equal(together.codes[rows], alone.codes), f"group {j}"
        assert torch.equal(together.scales[rows], alone.scales), f"group {j}"
