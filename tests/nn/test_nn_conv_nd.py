"""QConv1d/QConv3d/QConvTranspose1d/QConvTranspose3d (and the 2-D twins through the same N-D base): SQNR against
the float conv per format, fake-quant == frozen bit for bit, the geometry matches torch's own modules exactly with
the dequantized weight, activations are quantized per pixel/voxel across channels, the transposed GEMM view groups
along input channels, and ``quantize_model`` + save/load handle models made of them."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vqsuite
from vqsuite.config import QuantSpec, get_preset
from vqsuite.errors import UserError
from vqsuite.nn import (
    CONV_TWINS,
    QConv1d,
    QConv2d,
    QConv3d,
    QConvBase,
    QConvTranspose1d,
    QConvTranspose3d,
    QuantLayer,
)
from vqsuite.nn.quantizers import quantize_activation

#: spatial size per dims (small: the 3-D convs stay cheap)
SPATIAL = {1: 12, 2: 6, 3: 4}

#: minimum SQNR (dB) of the quantized conv against the float conv on Gaussian inputs and default-init weights.
#: Measured (torch 2.14 CPU) per spec, worst geometry: int8 W+A 41.9, int4 g32 weight-only 22.5, fp8 W+A 28.4,
#: nvfp4 W+A 16.8; the bars leave about 3 dB of margin.
MIN_SQNR_DB = {"w8a8": 38.0, "int4-g32": 19.5, "w8a8-fp8": 25.5, "nvfp4": 14.0}

SPECS: dict[str, QuantSpec] = {
    "w8a8": get_preset("w8a8").default,
    "int4-g32": QuantSpec(weight="int4", weight_group_size=32),
    "w8a8-fp8": get_preset("w8a8-fp8").default,
    "nvfp4": get_preset("nvfp4").default,
}

CONVS: dict[str, Callable[[], nn.Module]] = {
    "1d-plain": lambda: nn.Conv1d(32, 24, 3, padding=1),
    "1d-pointwise": lambda: nn.Conv1d(64, 32, 1, bias=False),
    "1d-depthwise": lambda: nn.Conv1d(32, 32, 4, padding=2, groups=32),
    "1d-grouped-stride-dilation": lambda: nn.Conv1d(64, 32, 3, stride=2, padding=2, dilation=2, groups=2),
    "1d-reflect": lambda: nn.Conv1d(32, 16, 5, padding=2, padding_mode="reflect"),
    "1d-same": lambda: nn.Conv1d(32, 16, 5, padding="same", dilation=2),
    "3d-plain": lambda: nn.Conv3d(16, 24, 3, padding=1),
    "3d-rect-stride": lambda: nn.Conv3d(32, 16, (1, 2, 2), stride=(1, 2, 2)),
    "3d-grouped-dilation": lambda: nn.Conv3d(32, 32, 3, padding=(1, 2, 2), dilation=(1, 2, 2), groups=2),
    "3d-circular": lambda: nn.Conv3d(16, 8, 3, padding=1, padding_mode="circular"),
    "3d-replicate-same": lambda: nn.Conv3d(16, 8, (1, 3, 3), padding=(0, 1, 1), padding_mode="replicate"),
}
CONV_TS: dict[str, Callable[[], nn.Module]] = {
    "t1d-up2x": lambda: nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1),
    "t1d-grouped-outpad": lambda: nn.ConvTranspose1d(64, 32, 3, stride=2, padding=1, output_padding=1, groups=2),
    "t1d-dilated": lambda: nn.ConvTranspose1d(32, 16, 3, stride=2, padding=1, dilation=2, bias=False),
    "t3d-up2x": lambda: nn.ConvTranspose3d(32, 16, (1, 2, 2), stride=(1, 2, 2)),
    "t3d-grouped-outpad": lambda: nn.ConvTranspose3d(64, 32, 3, stride=2, padding=1, output_padding=1, groups=2),
    "t2d-depthwise": lambda: nn.ConvTranspose2d(32, 32, 3, stride=2, padding=1, groups=32),
}
ALL = {**CONVS, **CONV_TS}


def _dims(module: nn.Module) -> int:
    return len(module.kernel_size)


def _x(module: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, module.in_channels, *([SPATIAL[_dims(module)]] * _dims(module)), generator=g)


def _build(geometry: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ALL[geometry]()


def _fit(spec: QuantSpec, module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        k = module.in_channels // module.groups
    else:
        k = module.in_channels // module.groups * math.prod(module.kernel_size)
    return spec.incompatibility(k, act_features=module.in_channels)


def _cases() -> list:
    out = []
    for gname in ALL:
        m = ALL[gname]()
        out += [pytest.param(gname, s, id=f"{gname}-{s}") for s, spec in SPECS.items() if _fit(spec, m) is None]
    return out


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def _channels_last_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reference activation quantization of a conv input: per pixel/voxel, across channels."""
    return quantize_activation(x.movedim(1, -1), spec).movedim(-1, 1)


# ---------------------------------------------------------------------------- accuracy and states
@pytest.mark.parametrize("geometry, spec_name", _cases())
def test_nd_conv_close_to_float_and_fake_quant_equals_frozen(geometry: str, spec_name: str) -> None:
    conv = _build(geometry)
    q = CONV_TWINS[type(conv)].from_float(conv, SPECS[spec_name])
    x = _x(conv)
    with torch.no_grad():
        ref = conv(x)
        y_fake = q(x)
        w_fake = q.effective_weight()
        q.freeze()
        y_frozen = q(x)
    assert y_frozen.shape == ref.shape
    assert torch.equal(y_fake, y_frozen)
    assert torch.equal(w_fake, q.weight)
    assert _sqnr_db(ref, y_frozen) >= MIN_SQNR_DB[spec_name], f"{_sqnr_db(ref, y_frozen):.1f} dB"


def test_every_new_dims_has_a_4bit_and_an_fp_case() -> None:
    """Guard for the tables above: each new conv type meets a 4-bit and a float-format spec somewhere."""
    seen: dict[type, set[str]] = {}
    for param in _cases():
        geometry, spec_name = param.values
        seen.setdefault(type(ALL[geometry]()), set()).add(spec_name)
    for t in (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d):
        assert {"int4-g32", "w8a8-fp8"} <= seen[t], t.__name__
    assert "nvfp4" in seen[nn.Conv1d] and "nvfp4" in seen[nn.Conv3d] and "nvfp4" in seen[nn.ConvTranspose1d]


@pytest.mark.parametrize("geometry", list(ALL))
def test_nd_geometry_matches_torch_with_the_dequantized_weight(geometry: str) -> None:
    conv = _build(geometry)
    q = CONV_TWINS[type(conv)].from_float(conv, QuantSpec(weight="int8")).freeze()
    ref = _build(geometry, seed=1)
    with torch.no_grad():
        ref.weight.copy_(q.weight)
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    x = _x(conv)
    assert torch.equal(q(x), ref(x))
    if isinstance(conv, nn.modules.conv._ConvTransposeNd) and conv.stride[0] > 1:
        smallest = [s - p for s, p in zip(ref(x).shape[2:], conv.output_padding, strict=True)]
        for size in (smallest, [s + 1 for s in smallest]):  # output_size picks output_padding 0, then 1
            assert torch.equal(q(x, output_size=size), ref(x, output_size=size))
            assert list(q(x, output_size=size).shape[2:]) == size


@pytest.mark.parametrize("geometry", ["1d-plain", "3d-plain", "t1d-up2x", "t3d-grouped-outpad"])
def test_nd_activations_per_voxel_across_channels(geometry: str) -> None:
    conv = _build(geometry)
    spec = get_preset("w8a8").default
    q = CONV_TWINS[type(conv)].from_float(conv, spec).freeze()
    x = _x(conv)
    ref = _build(geometry, seed=1)
    with torch.no_grad():
        ref.weight.copy_(q.weight)
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
        assert torch.equal(q(x), ref(_channels_last_quant(x, spec)))
        assert not torch.allclose(q(x), ref(x), atol=1e-4)  # the activations really are quantized
        assert torch.equal(q(x[0]), q(x[:1])[0])  # unbatched input, same channel dim


@pytest.mark.parametrize("cls, dims", [(QConvTranspose1d, 1), (QConvTranspose3d, 3)])
def test_transposed_gemm_view_rows_are_group_outchannel_kernel_cols_input_channels(cls: type, dims: int) -> None:
    i, o, g, k = 8, 6, 2, 2
    q = cls(i, o, k, groups=g, spec=QuantSpec(weight="int8"))
    w = torch.arange(math.prod(q.weight_shape), dtype=torch.float32).reshape(q.weight_shape)
    gemm = q._to_gemm(w)
    assert gemm.shape == (o * k**dims, i // g)
    i_g, o_g = i // g, o // g
    for gi in range(g):
        for oc in range(o_g):
            for kk in range(k**dims):
                kpos = tuple(kk // k**e % k for e in reversed(range(dims)))  # kernel position, row-major
                row = (gi * o_g + oc) * k**dims + kk
                expected = w[(slice(gi * i_g, (gi + 1) * i_g), oc, *kpos)]
                assert torch.equal(gemm[row], expected)
    assert torch.equal(q._from_gemm(gemm), w)


def test_nd_straight_through_gradients() -> None:
    conv = _build("3d-plain")
    q = QConv3d.from_float(conv, get_preset("w8a8").default)
    x = _x(conv).requires_grad_()
    q(x).sum().backward()
    assert q.weight.grad is not None and x.grad is not None
    assert float(q.weight.grad.abs().sum()) > 0 and float(x.grad.abs().sum()) > 0


def test_nd_invalid_arguments_name_the_value() -> None:
    with pytest.raises(UserError, match="kernel_size"):
        QConv1d(8, 8, (3, 3))
    with pytest.raises(UserError, match="groups=3"):
        QConv3d(8, 8, 3, groups=3)
    with pytest.raises(UserError, match="padding_mode"):
        QConv1d(8, 8, 3, padding="same", padding_mode="reflect")


def test_qconv2d_stays_subclassable_with_a_padding_forward() -> None:
    """A subclass that pads first and calls ``super().forward(input)`` (the pattern of a 'same'-padding conv)."""

    class PadFirst(QConv2d):
        def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
            return super().forward(F.pad(input, (1, 1, 1, 1)))

    conv = nn.Conv2d(16, 8, 3)
    q = PadFirst.from_float(conv, QuantSpec(weight="int8"))
    assert type(q) is PadFirst and isinstance(q, QConvBase) and q.dims == 2
    x = torch.randn(1, 16, 5, 5)
    y_fake = q(input=x)
    assert y_fake.shape == (1, 8, 5, 5)
    assert torch.equal(q.freeze()(x), y_fake)


# ---------------------------------------------------------------------------- quantize_model and save/load
def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.ModuleDict(
        {
            "seq1d": nn.Sequential(
                nn.Conv1d(16, 32, 3, padding=1), nn.ReLU(), nn.ConvTranspose1d(32, 32, 4, stride=2, padding=1)
            ),
            "seq3d": nn.Sequential(
                nn.Conv3d(16, 32, (1, 3, 3), padding=(0, 1, 1)),
                nn.ReLU(),
                nn.ConvTranspose3d(32, 16, (1, 2, 2), stride=(1, 2, 2)),
            ),
        }
    )


class _Both(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = _net(seed)

    def forward(self, x1: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net["seq1d"](x1).flatten(1), self.net["seq3d"](x3).flatten(1)], dim=1)


@pytest.mark.parametrize("preset", ["w8a8", "w4a4"])
def test_quantize_model_quantizes_nd_convs_and_round_trips_bit_identically(preset: str, tmp_path: Path) -> None:
    model = _Both()
    x1, x3 = torch.randn(2, 16, 8), torch.randn(2, 16, 2, 4, 4)
    with torch.no_grad():
        ref = model(x1, x3)
    vqsuite.quantize_model(model, preset)
    report = model.vqsuite_report
    assert {e.type for e in report.quantized} == {"Conv1d", "ConvTranspose1d", "Conv3d", "ConvTranspose3d"}
    assert report.skipped == [] and report.quantized_fraction == 1.0
    expected = {"QConv1d", "QConvTranspose1d", "QConv3d", "QConvTranspose3d"}
    assert {type(m).__name__ for m in model.modules() if isinstance(m, QuantLayer)} == expected
    with torch.no_grad():
        y = model(x1, x3)
    assert _sqnr_db(ref, y) >= MIN_SQNR_DB["nvfp4"]  # a loose sanity bar: the layers compute the right thing
    vqsuite.save_quantized(model, tmp_path / "ck")
    fresh = _Both(seed=123)  # different float weights: everything must come from the checkpoint
    loaded = vqsuite.load_quantized(tmp_path / "ck", model=fresh)
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), n
    with torch.no_grad():
        assert torch.equal(loaded(x1, x3), y)
