"""INT8 / INT4, symmetric and asymmetric: ranges, scale and zero-point rules, granularities, errors, zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from formats_reference import INT_RANGES, reference_quantize, to_groups

import vqsuite.formats as F

INT_FORMATS = list(INT_RANGES)
ALL_FORMATS = ["int8", "int8_asym", "int4", "int4_asym", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nvfp4", "mxfp4"]
# largest |x - x^| for a value inside the range: half a quantization step (plus float32 rounding of x / scale)
HALF_STEP = 0.5
FLOAT32_REL_SLOP = 2.0**-20

GRANULARITIES = [
    ({"per_tensor": True}, "per_tensor"),
    ({"group_size": None}, "per_channel"),
    ({"group_size": 32}, "g32"),
    ({"group_size": 64}, "g64"),
    ({"group_size": 128}, "g128"),
    ({"group_size": 32, "axis": 0}, "g32_axis0"),
    ({"group_size": None, "axis": 0}, "per_channel_axis0"),
]


def _random(seed: int, shape=(64, 256), shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) + shift
    return x * 10.0 ** ((torch.rand(shape[0], 1, generator=gen) - 0.5) * 6)  # rows over 6 decades


# ----------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_format_metadata(fmt):
    qmin, qmax, asym = INT_RANGES[fmt]
    f = F.get_format(fmt)
    assert (f.kind, f.qmin, f.qmax, f.asymmetric) == ("int", qmin, qmax, asym)
    assert f.bits == (8 if fmt.startswith("int8") else 4)


def test_registry_lists_every_format_and_rejects_unknown():
    assert set(ALL_FORMATS) <= set(F.list_formats())
    assert F.list_formats() == sorted(F.list_formats())
    with pytest.raises(ValueError, match="int5"):
        F.get_format("int5")
    with pytest.raises(ValueError, match="known formats"):
        F.quantize(torch.ones(4), "int5")


# ----------------------------------------------------------------------------- library vs reference


@pytest.mark.parametrize("kwargs", [g for g, _ in GRANULARITIES], ids=[i for _, i in GRANULARITIES])
@pytest.mark.parametrize("fmt", INT_FORMATS)
@pytest.mark.parametrize("shift", [0.0, 1.5], ids=["centered", "shifted"])
def test_matches_reference_on_random_tensors(fmt, kwargs, shift):
    x = _random(0, shift=shift)
    axis, per_tensor, g = kwargs.get("axis", -1), kwargs.get("per_tensor", False), kwargs.get("group_size")
    qt = F.quantize(x, fmt, **kwargs)
    ref = reference_quantize(x.numpy(), fmt, g, axis, per_tensor)
    codes = to_groups(qt.codes.view(torch.uint8).numpy(), g, axis, per_tensor).astype(np.uint8)
    np.testing.assert_array_equal(codes, ref.codes, err_msg="codes")
    np.testing.assert_array_equal(qt.scales.numpy().reshape(ref.scales.shape), ref.scales, err_msg="scales")
    if ref.zero_points is None:
        assert qt.zero_points is None
    else:
        np.testing.assert_array_equal(qt.zero_points.numpy().reshape(ref.zero_points.shape), ref.zero_points)
    deq = to_groups(F.dequantize(qt).numpy(), g, axis, per_tensor)
    np.testing.assert_array_equal(deq, ref.dequant, err_msg="dequantized values")


@pytest.mark.parametrize("kwargs", [g for g, _ in GRANULARITIES], ids=[i for _, i in GRANULARITIES])
@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_shapes_and_dtypes(fmt, kwargs):
    x = _random(1, (64, 256))
    qt = F.quantize(x, fmt, **kwargs)
    codes, scales, zeros = qt  # unpacks as (codes, scales, zero_points)
    assert codes.shape == x.shape
    assert codes.dtype == (torch.uint8 if INT_RANGES[fmt][2] else torch.int8)
    axis, g = kwargs.get("axis", -1), kwargs.get("group_size")
    if kwargs.get("per_tensor"):
        expected = ()
    else:
        k = x.shape[axis]
        other = x.shape[1] if axis == 0 else x.shape[0]
        expected = (other, k // (g or k))
    assert scales.shape == expected and scales.dtype == torch.float32
    if INT_RANGES[fmt][2]:
        assert zeros.shape == expected and zeros.dtype == torch.uint8
    else:
        assert zeros is None
    assert F.dequantize(qt).shape == x.shape


# ----------------------------------------------------------------------------- INT4 / INT8 rules


@pytest.mark.parametrize("fmt, qmax", [("int4", 7), ("int8", 127)])
def test_symmetric_scale_and_range(fmt, qmax):
    x = _random(2, (16, 128))
    qt = F.quantize(x, fmt, group_size=64)
    amax = x.abs().reshape(16, 2, 64).amax(-1)
    assert torch.equal(qt.scales, amax / qmax)
    qmin = -qmax - 1
    assert int(qt.codes.min()) >= qmin and int(qt.codes.max()) <= qmax
    # the group's amax element maps to +-qmax exactly
    c = qt.codes.reshape(16, 2, 64).abs().amax(-1)
    assert torch.all(c == qmax)


def test_int4_code_minus_8_is_reachable_with_a_rounded_scale():
    # amax / 7 is 1.4x the smallest float16 subnormal and is stored as 2^-24: -amax / scale = -9.8 clamps to -8
    # (the bottom of the signed range), +amax to 7
    amax = 7 * 1.4 * 2.0**-24
    x = torch.tensor([[-amax, amax, 0.0, 2.0**-24]])
    qt = F.quantize(x, "int4", scale_dtype=torch.float16)
    assert qt.scales.item() == 2.0**-24
    assert qt.codes[0].tolist() == [-8, 7, 0, 1]
    assert F.dequantize(qt)[0].tolist() == [-8 * 2.0**-24, 7 * 2.0**-24, 0.0, 2.0**-24]


@pytest.mark.parametrize("fmt, qmax", [("int4_asym", 15), ("int8_asym", 255)])
def test_asymmetric_scale_zero_point_and_range(fmt, qmax):
    x = _random(3, (16, 128), shift=0.7)
    qt = F.quantize(x, fmt, group_size=32)
    xg = x.reshape(16, 4, 32)
    lo = xg.amin(-1).clamp(max=0)
    hi = xg.amax(-1).clamp(min=0)
    assert torch.equal(qt.scales, (hi - lo) / qmax)
    assert torch.equal(qt.zero_points, torch.round(-lo / qt.scales).to(torch.uint8))
    assert int(qt.codes.max()) <= qmax and qt.codes.dtype == torch.uint8
    # zero is exactly representable: code z dequantizes to 0
    z = qt.zero_points.unsqueeze(-1).expand(16, 4, 32).reshape(16, 128)
    qz = F.QTensor(z.clone(), qt.scales, fmt, 32, zero_points=qt.zero_points)
    assert torch.all(F.dequantize(qz) == 0)


@pytest.mark.parametrize("fmt", ["int4_asym", "int8_asym"])
def test_asymmetric_all_positive_and_all_negative_groups(fmt):
    qmax = INT_RANGES[fmt][1]
    x = torch.tensor([[0.5, 1.0, 2.0, 4.0], [-4.0, -2.0, -1.0, -0.5]])
    qt = F.quantize(x, fmt)
    # the range is widened to include 0: [0, 4] and [-4, 0]
    assert qt.zero_points.reshape(-1).tolist() == [0, qmax]
    assert qt.codes[0, 3].item() == qmax and qt.codes[1, 0].item() == 0
    got = F.dequantize(qt)[:, [0, 3]].reshape(-1).tolist()
    assert got == pytest.approx([0.5, 4.0, -4.0, -0.5], abs=HALF_STEP * 4.0 / qmax)


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_error_is_at_most_half_a_step(fmt):
    x = _random(4, (32, 256), shift=0.3)
    qt = F.quantize(x, fmt, group_size=128)
    err = (F.dequantize(qt) - x).abs().reshape(32, 2, 128)
    step = qt.scales.unsqueeze(-1)
    bound = HALF_STEP * step + FLOAT32_REL_SLOP * x.abs().reshape(32, 2, 128)
    assert torch.all(err <= bound)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_stored_16_bit_scale_is_the_one_used(fmt, scale_dtype):
    qmin, qmax, asym = INT_RANGES[fmt]
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5)) * 10 + (2.0 if asym else 0.0)
    qt = F.quantize(x, fmt, scale_dtype=scale_dtype)
    assert qt.scales.dtype == scale_dtype
    s = qt.scales.float()  # [8, 1]: one scale per row
    z = qt.zero_points.float() if asym else torch.zeros_like(s)
    expected = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    assert torch.equal(qt.codes.float(), expected)
    assert torch.equal(F.dequantize(qt), (qt.codes.float() - z) * s)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("axis", [-1, 0], ids=["axis-1", "axis0"])
@pytest.mark.parametrize("fmt", ["int4", "int8_asym", "fp8_e4m3", "fp4_e2m1"])
def test_group_size_not_dividing_k_names_the_group(fmt, axis):
    x = torch.randn(96, 96)
    with pytest.raises(ValueError, match="group_size=64"):
        F.quantize(x, fmt, group_size=64, axis=axis)


@pytest.mark.parametrize("group_size", [0, -32], ids=["zero", "negative"])
def test_non_positive_group_size(group_size):
    with pytest.raises(ValueError, match=f"group_size={group_size}"):
        F.quantize(torch.randn(4, 64), "int4", group_size=group_size)


@pytest.mark.parametrize(
    "x, kwargs, match",
    [
        (torch.empty(0, 4), {}, "empty"),
        (torch.tensor(1.0), {}, "0-d"),
        (torch.randn(4, 8), {"axis": 2}, "axis=2"),
    ],
    ids=["empty", "0d_not_per_tensor", "axis_out_of_range"],
)
def test_bad_shapes_name_the_tensor(x, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        F.quantize(x, "int8", name="blocks.3.w", **kwargs)
    assert "blocks.3.w" in str(info.value)


def test_0d_tensor_per_tensor():
    qt = F.quantize(torch.tensor(-3.5), "int8", per_tensor=True)
    assert qt.codes.shape == () and qt.scales.shape == ()
    assert qt.codes.item() == -127 and qt.scales.item() == (torch.tensor(3.5) / 127).item()
    assert F.dequantize(qt).item() == pytest.approx(-3.5, rel=FLOAT32_REL_SLOP)


BAD_VALUES = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_non_finite_input_raises_naming_the_tensor(fmt, dtype, bad):
    x = torch.randn(2, 64).to(dtype)
    x[1, 17] = bad
    with pytest.raises(ValueError, match=r"layer7\.weight"):
        F.quantize(x, fmt, name="layer7.weight")
    with pytest.raises(ValueError, match="act_in"):
        F.fake_quantize(x, fmt, name="act_in")


# ----------------------------------------------------------------------------- zeros


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_all_zero_group_quantizes_to_zero_codes(fmt):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    x[1, 32:] = 0.0
    x[3, 32:] = -0.0
    group = None if fmt in ("nvfp4", "mxfp4") else 32
    qt = F.quantize(x, fmt, group_size=group)
    zero_code = {"int8_asym": "zp", "int4_asym": "zp"}.get(fmt, 0)
    codes = qt.codes.view(torch.uint8) if qt.codes.dtype.is_floating_point else qt.codes
    for row in (1, 3):
        c = codes[row, 32:]
        if zero_code == "zp":
            assert torch.all(c == qt.zero_points[row, 1])
            assert qt.zero_points[row, 1].item() == 0 and qt.scales[row, 1].item() == 0
        elif qt.codes.dtype.is_floating_point:
            assert torch.all(qt.codes[row, 32:].float() == 0)  # +0 or -0
        else:
            assert torch.all(c == 0)
    deq = F.dequantize(qt)
    assert torch.isfinite(deq).all()
    assert torch.all(deq[1, 32:] == 0) and torch.all(deq[3, 32:] == 0)
    assert torch.all(F.fake_quantize(x, fmt, group_size=group)[[1, 3], 32:] == 0)


ZERO_TENSOR_CASES = [(f, False) for f in ALL_FORMATS] + [(f, True) for f in ALL_FORMATS if f not in ("nvfp4", "mxfp4")]


@pytest.mark.parametrize(
    "fmt, per_tensor", ZERO_TENSOR_CASES, ids=[f"{f}-{'per_tensor' if p else 'grouped'}" for f, p in ZERO_TENSOR_CASES]
)
def test_all_zero_tensor(fmt, per_tensor):
    x = torch.zeros(3, 64)
    qt = F.quantize(x, fmt, per_tensor=per_tensor)
    codes = qt.codes.float() if qt.codes.dtype.is_floating_point else qt.codes
    assert torch.all(codes == 0)
    deq = F.dequantize(qt)
    assert torch.all(deq == 0) and not torch.isnan(deq).any()


# ----------------------------------------------------------------------------- extremes


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_float32_extremes_stay_finite(fmt):
    # a group spanning the whole float32 range: (max - min) overflows float32 unless computed with care
    big = float(torch.finfo(torch.float32).max)
    x = torch.tensor([[-big, big, 1.0, -1.0], [big, big / 3, 0.0, 0.0], [-big, -1.0, 0.0, 2.0]])
    qt = F.quantize(x, fmt)
    assert torch.isfinite(qt.scales).all()
    deq = F.dequantize(qt)
    assert torch.isfinite(deq).all()
    assert torch.all((deq - x).abs() <= qt.scales * (HALF_STEP + FLOAT32_REL_SLOP) + 1.0)  # scales: [3, 1]


@pytest.mark.parametrize("fmt", ["int8_asym", "int4_asym"])
def test_float16_input_near_its_max_does_not_overflow(fmt):
    # the zero point rounds, so (qmax - z) * scale can exceed max(x) by up to half a step: past 65504
    x = torch.tensor([[-77.0, 65504.0] * 8], dtype=torch.float16)
    out = F.fake_quantize(x, fmt)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    assert out[0, 1].item() == 65504.0


@pytest.mark.parametrize("fmt", ["int8", "int8_asym", "fp8_e4m3", "fp4_e2m1"])
def test_scale_that_overflows_its_16_bit_dtype_is_refused(fmt):
    x = torch.tensor([[1e9, -3.0, 2.0, 0.5]])
    with pytest.raises(ValueError, match="w_big"):
        F.quantize(x, fmt, scale_dtype=torch.float16, name="w_big")
