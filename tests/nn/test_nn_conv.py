"""QConv2d / QConvTranspose2d: fake-quant == frozen bit for bit for every preset a geometry fits, the conv
geometry (stride, padding, dilation, groups, padding modes, output_size) matches torch's own modules exactly,
frozen layers drop their float weight, gradients pass straight through."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vqsuite
from vqsuite.config import QuantSpec, get_preset
from vqsuite.formats import get_format
from vqsuite.nn import QConv2d, QConvTranspose2d
from vqsuite.nn.quantizers import quantize_activation

#: presets usable without calibration (static-activation presets need calib_data: their fake-quant == frozen check
#: runs calibrated in tests/config/test_config_lowbit_presets.py)
ALL_PRESETS = [p for p in vqsuite.list_presets() if vqsuite.get_preset(p).default.act_mode != "static"]
PER_CHANNEL_INT8 = QuantSpec(weight="int8")  # depthwise 3x3 has K = 9: no group of 64/32/16 fits
WEIGHT_ONLY = "w8a16"
SPATIAL = 8

CONVS: dict[str, Callable[[], nn.Conv2d]] = {
    "plain-3x3": lambda: nn.Conv2d(64, 32, 3, padding=1),
    "pointwise": lambda: nn.Conv2d(64, 48, 1, bias=False),
    "depthwise-3x3": lambda: nn.Conv2d(32, 32, 3, padding=1, groups=32),
    "grouped": lambda: nn.Conv2d(64, 64, 3, padding=1, groups=2),
    "stride-pad-dilation": lambda: nn.Conv2d(64, 32, 3, stride=2, padding=(2, 1), dilation=(2, 1)),
    "reflect": lambda: nn.Conv2d(64, 32, 3, padding=(1, 2), padding_mode="reflect"),
    "circular": lambda: nn.Conv2d(64, 32, 3, padding=1, padding_mode="circular"),
    "same": lambda: nn.Conv2d(64, 32, (3, 5), padding="same"),
    "rect-kernel": lambda: nn.Conv2d(64, 32, (1, 4), stride=(1, 2)),
}
CONV_TS: dict[str, Callable[[], nn.ConvTranspose2d]] = {
    "up2x": lambda: nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
    "grouped-outpad": lambda: nn.ConvTranspose2d(64, 64, 3, stride=2, padding=1, output_padding=1, groups=2),
    "dilated": lambda: nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, dilation=2, bias=False),
    "depthwise": lambda: nn.ConvTranspose2d(32, 32, 3, stride=2, padding=1, groups=32),
}


def _fit(spec: QuantSpec, module: nn.Module) -> str | None:
    if isinstance(module, nn.ConvTranspose2d):
        return spec.incompatibility(module.in_channels // module.groups, act_features=module.in_channels)
    k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return spec.incompatibility(k, act_features=module.in_channels)


def _cases(builders: dict[str, Callable[[], nn.Module]]) -> list:
    """Every (geometry, preset) pair the preset fits, plus per-channel INT8 for each geometry."""
    out = []
    for gname, build in builders.items():
        m = build()
        for p in ALL_PRESETS:
            if _fit(get_preset(p).default, m) is None:
                out.append(pytest.param(gname, p, id=f"{gname}-{p}"))
        out.append(pytest.param(gname, "int8-per-channel", id=f"{gname}-int8-per-channel"))
    return out


def _spec(name: str) -> QuantSpec:
    return PER_CHANNEL_INT8 if name == "int8-per-channel" else get_preset(name).default


def _channels_last_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reference activation quantization of a conv input: per pixel, across channels."""
    return quantize_activation(x.movedim(1, -1), spec).movedim(-1, 1)


# ---------------------------------------------------------------------------- conv2d
@pytest.mark.parametrize("geometry, preset", _cases(CONVS))
def test_conv2d_fake_quant_equals_frozen_bit_for_bit(geometry: str, preset: str) -> None:
    conv = CONVS[geometry]()
    q = QConv2d.from_float(conv, _spec(preset))
    x = torch.randn(2, conv.in_channels, SPATIAL, SPATIAL)
    w_fake = q.effective_weight()
    y_fake = q(x)
    q.freeze()
    y_frozen = q(x)
    assert y_frozen.shape == conv(x).shape
    assert torch.equal(y_fake, y_frozen)
    assert torch.equal(w_fake, q.weight)


def test_every_conv_geometry_but_depthwise_has_a_4bit_case() -> None:
    """Guard for the table above: a geometry no 4-bit preset fits would only be tested in 8 bits."""
    four_bit = {
        geometry
        for geometry, preset in (c.values for c in _cases(CONVS))
        if preset != "int8-per-channel" and get_format(get_preset(preset).default.weight).bits == 4
    }
    assert four_bit == set(CONVS) - {"depthwise-3x3"}


@pytest.mark.parametrize("geometry", list(CONVS))
def test_conv2d_geometry_matches_torch_with_the_dequantized_weight(geometry: str) -> None:
    conv = CONVS[geometry]()
    q = QConv2d.from_float(conv, get_preset(WEIGHT_ONLY).default).freeze()
    ref = CONVS[geometry]()
    with torch.no_grad():
        ref.weight.copy_(q.weight)
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    x = torch.randn(2, conv.in_channels, SPATIAL + 1, SPATIAL)
    assert torch.equal(q(x), ref(x))


@pytest.mark.parametrize("preset", ["w8a8", "w4a4", "nvfp4"])
def test_conv2d_quantizes_activations_per_pixel_across_channels(preset: str) -> None:
    conv = CONVS["plain-3x3"]()
    spec = get_preset(preset).default
    q = QConv2d.from_float(conv, spec).freeze()
    x = torch.randn(2, 64, SPATIAL, SPATIAL)
    expected = F.conv2d(_channels_last_quant(x, spec), q.weight, conv.bias, conv.stride, conv.padding)
    assert torch.equal(q(x), expected)
    assert not torch.allclose(q(x), F.conv2d(x, q.weight, conv.bias, conv.stride, conv.padding), atol=1e-4)


def test_conv2d_unbatched_input() -> None:
    q = QConv2d.from_float(CONVS["plain-3x3"](), get_preset("w8a8").default).freeze()
    x = torch.randn(2, 64, SPATIAL, SPATIAL)
    assert torch.equal(q(x[0]), q(x[:1])[0])


def test_depthwise_per_channel_int8_frozen_storage() -> None:
    conv = CONVS["depthwise-3x3"]()
    q = QConv2d.from_float(conv, PER_CHANNEL_INT8).freeze()
    assert q.gemm_shape == (32, 9)
    assert {n: tuple(t.shape) for n, t in q.named_buffers()} == {"qweight": (32, 9), "wscales": (32, 1)}
    assert q.qweight.dtype == torch.int8
    with pytest.raises(ValueError, match="weight_group_size=64 must divide in_features=9"):
        QConv2d.from_float(conv, get_preset("w4a16").default)


def test_conv2d_frozen_drops_weight_parameter_and_shrinks() -> None:
    conv = nn.Conv2d(64, 64, 3, padding=1)
    before = vqsuite.module_nbytes(conv)
    q = QConv2d.from_float(conv, get_preset("w4a16").default)
    w_fake = q.effective_weight().detach().clone()
    q.freeze()
    assert "weight" not in dict(q.named_parameters())
    assert not isinstance(q.weight, nn.Parameter)
    assert q.weight.shape == conv.weight.shape and torch.equal(q.weight, w_fake)
    assert q.qweight.shape == (64, 64 * 9 // 2) and q.wscales.shape == (64, 9)
    assert before / vqsuite.module_nbytes(q) > 3.0


def test_conv2d_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="groups=3 must divide in_channels=64"):
        QConv2d(64, 32, 3, groups=3)
    with pytest.raises(ValueError, match="padding='same' with padding_mode='reflect'"):
        QConv2d(64, 32, 3, padding="same", padding_mode="reflect")


def test_conv2d_straight_through_gradients() -> None:
    conv = CONVS["stride-pad-dilation"]()
    spec = get_preset("w4a4").default
    q = QConv2d.from_float(conv, spec)
    x = torch.randn(2, 64, SPATIAL, SPATIAL, requires_grad=True)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    # reference: the same conv on detached quantized leaves; STE means the gradients are theirs
    xq = _channels_last_quant(x.detach(), spec).requires_grad_()
    wq = q.effective_weight().detach().requires_grad_()
    F.conv2d(xq, wq, conv.bias.detach(), conv.stride, conv.padding, conv.dilation).backward(g)
    assert torch.allclose(q.weight.grad, wq.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(x.grad, xq.grad, rtol=1e-4, atol=1e-5)
    assert q.bias.grad is not None and q.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- conv transpose
@pytest.mark.parametrize("geometry, preset", _cases(CONV_TS))
def test_conv_transpose_fake_quant_equals_frozen_bit_for_bit(geometry: str, preset: str) -> None:
    conv = CONV_TS[geometry]()
    q = QConvTranspose2d.from_float(conv, _spec(preset))
    x = torch.randn(2, conv.in_channels, 5, 5)
    w_fake = q.effective_weight()
    y_fake = q(x)
    q.freeze()
    y_frozen = q(x)
    assert y_frozen.shape == conv(x).shape
    assert torch.equal(y_fake, y_frozen)
    assert torch.equal(w_fake, q.weight)


@pytest.mark.parametrize("geometry", list(CONV_TS))
def test_conv_transpose_geometry_matches_torch_with_the_dequantized_weight(geometry: str) -> None:
    conv = CONV_TS[geometry]()
    q = QConvTranspose2d.from_float(conv, get_preset(WEIGHT_ONLY).default).freeze()
    ref = CONV_TS[geometry]()
    with torch.no_grad():
        ref.weight.copy_(q.weight)
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    x = torch.randn(2, conv.in_channels, 5, 4)
    assert torch.equal(q(x), ref(x))


@pytest.mark.parametrize("output_size", [[10, 10], [11, 11], [2, 32, 11, 10]], ids=["10x10", "11x11", "full-shape"])
@pytest.mark.parametrize("preset", ["w8a16", "w4a8"])
def test_conv_transpose_output_size(preset: str, output_size: list[int]) -> None:
    conv = CONV_TS["up2x"]()  # 5 -> 10 by default; output_size may ask for 11 (output_padding 1)
    q = QConvTranspose2d.from_float(conv, get_preset(preset).default)
    x = torch.randn(2, 64, 5, 5)
    y_fake = q(x, output_size=output_size)
    q.freeze()
    y = q(x, output_size=output_size)
    assert tuple(y.shape[-2:]) == tuple(output_size[-2:])
    assert torch.equal(y, y_fake)
    if preset == "w8a16":
        ref = CONV_TS["up2x"]()
        with torch.no_grad():
            ref.weight.copy_(q.weight)
            ref.bias.copy_(conv.bias)
        assert torch.equal(y, ref(x, output_size=output_size))


def test_conv_transpose_gemm_view_groups_along_input_channels() -> None:
    """GEMM view [N = O*kh*kw, K = I/g]: per-channel INT8 gives one scale per (group, out channel, tap)."""
    conv = CONV_TS["grouped-outpad"]()  # I = O = 64, g = 2, 3x3
    q = QConvTranspose2d.from_float(conv, PER_CHANNEL_INT8)
    assert q.gemm_shape == (64 * 9, 32)
    w = conv.weight.detach()
    assert torch.equal(q._from_gemm(q._to_gemm(w)), w)
    # row r of the GEMM view holds, for one group / out channel / tap, the weights of that group's inputs
    row = q._to_gemm(w)[9 * 32 + 4]  # group 1, out channel 0, tap (1, 1)
    assert torch.equal(row, w[32:64, 0, 1, 1])
    q.freeze()
    assert q.wscales.shape == (64 * 9, 1)
    amax = w.reshape(2, 32, 32, 3, 3).permute(0, 2, 3, 4, 1).reshape(64 * 9, 32).abs().amax(-1, keepdim=True)
    assert torch.allclose(q.wscales, amax / 127)


def test_conv_transpose_straight_through_gradients() -> None:
    conv = CONV_TS["grouped-outpad"]()
    spec = get_preset("nvfp4").default
    q = QConvTranspose2d.from_float(conv, spec)
    x = torch.randn(2, 64, 5, 5, requires_grad=True)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    xq = _channels_last_quant(x.detach(), spec).requires_grad_()
    wq = q.effective_weight().detach().requires_grad_()
    F.conv_transpose2d(xq, wq, conv.bias.detach(), 2, 1, 1, 2).backward(g)
    assert torch.allclose(q.weight.grad, wq.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(x.grad, xq.grad, rtol=1e-4, atol=1e-5)


def test_conv_transpose_frozen_drops_weight_parameter() -> None:
    q = QConvTranspose2d.from_float(CONV_TS["up2x"](), get_preset("w4a16").default).freeze()
    assert "weight" not in dict(q.named_parameters())
    assert q.weight.shape == (64, 32, 4, 4)
    assert q.qweight.shape == (32 * 16, 32) and q.wscales.shape == (32 * 16, 1)
