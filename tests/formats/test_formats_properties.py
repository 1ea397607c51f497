"""Hypothesis properties over random tensors for every format.

Inputs mix zeros (also whole zero blocks), float32 denormals, values up to 1e30 and magnitudes spread over
many decades, in float32, bfloat16 and float16, grouped per tensor, per channel, per group and along axis 0.
Each example checks: finite output of the input's shape and dtype, bit-exact agreement with the reference
implementations, codes and scales in range, the error bound of the format, sign symmetry, 4-bit packing,
and idempotence where it truly holds (see ``IDEMPOTENT``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from formats_reference import E4M3_TABLE, F32, INT_RANGES, reference_quantize, to_groups
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vqsuite.formats as F

FORMATS = ["int8", "int8_asym", "int4", "int4_asym", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nvfp4", "mxfp4"]
BLOCK = {"nvfp4": 16, "mxfp4": 32}
FOUR_BIT = {"int4", "int4_asym", "fp4_e2m1", "nvfp4", "mxfp4"}
SYMMETRIC = [f for f in FORMATS if not f.endswith("_asym")]
INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# float element formats: (largest value, relative half-ulp 2^-(mantissa bits + 1), half the smallest subnormal)
FLOAT_ELEMENT = {
    "fp8_e4m3": (448.0, 2.0**-4, 2.0**-10),
    "fp8_e5m2": (57344.0, 2.0**-3, 2.0**-17),
    "fp4_e2m1": (6.0, 2.0**-2, 0.25),
    "nvfp4": (6.0, 2.0**-2, 0.25),
    "mxfp4": (6.0, 2.0**-2, 0.25),
}
INT_HALF_STEP = 0.5
# float32 rounding of x / scale and of code * scale, relative to the group's amax
FLOAT32_REL_SLOP = 2.0**-20
# absolute slack for float32 denormals (a subnormal scale carries few bits): 512 float32 denormal units
DENORMAL_ABS = 2.0**-140
# idempotence / symmetry may differ below the float32 normal range, where a subnormal scale re-rounds
BELOW_NORMAL_ABS = 2.0**-126
IDEMPOTENT_REL = 2.0**-21
# rounding of the float32 result to the input dtype: (relative half-ulp, half the smallest subnormal)
OUTPUT_ROUNDING = {
    torch.float32: (0.0, 0.0),
    torch.bfloat16: (2.0**-8, 2.0**-134),
    torch.float16: (2.0**-11, 2.0**-25),
}
# formats whose fake-quantization is idempotent: int/fp8/e2m1 with a float scale up to float32 rounding of
# amax / qmax (float32 input only: a 16-bit output re-rounds), MXFP4 exactly for every dtype (power-of-two
# scale, amax / X in [4, 8) stays in the same binade). Not asymmetric INT (a zero point tie can shrink the
# range) nor NVFP4 (a subnormal E4M3 block scale can round to 0 the second time).
IDEMPOTENT_APPROX = {"int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"}
IDEMPOTENT_EXACT = {"mxfp4"}
MAX_MAGNITUDE = float(np.float32(1e30))
PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

SPECIAL_VALUES = [
    0.0,
    -0.0,
    2.0**-149,
    -(2.0**-149),
    1e-40,
    2.0**-126,
    0.25,
    5.0,
    6.0,
    448.0,
    57344.0,
    65504.0,
    -65504.0,
    1e30,
    -1e30,
]


@st.composite
def quant_case(draw, fmt: str):
    """(x, kwargs) for ``F.quantize(x, fmt, **kwargs)``."""
    dtype = draw(st.sampled_from(INPUT_DTYPES))
    if fmt in BLOCK:
        mode = draw(st.sampled_from(["blocks_K", "blocks_axis0"]))
    else:
        mode = draw(st.sampled_from(["per_tensor", "per_channel", "g16", "g32", "per_channel_axis0", "g16_axis0"]))
    rows = draw(st.integers(1, 3))
    k = draw(st.sampled_from([32, 64]))
    seed = draw(st.integers(0, 2**32 - 1))
    center = draw(st.floats(-46.0, 30.0))  # log10 of the typical magnitude: denormals .. 1e30
    spread = draw(st.floats(0.0, 12.0))  # decades of spread, per element and per 16-slice
    zero_frac = draw(st.sampled_from([0.0, 0.0, 0.3, 0.95]))
    n_slices = rows * k // 16
    zero_slices = draw(st.lists(st.integers(0, n_slices - 1), max_size=2))
    specials = draw(
        st.lists(
            st.tuples(
                st.integers(0, rows * k - 1),
                st.one_of(
                    st.sampled_from(SPECIAL_VALUES),
                    st.floats(-MAX_MAGNITUDE, MAX_MAGNITUDE, allow_nan=False, allow_infinity=False, width=32),
                ),
            ),
            max_size=6,
        )
    )

    gen = np.random.default_rng(seed)
    slice_offset = np.repeat(gen.uniform(-spread, spread, n_slices), 16)
    log_mag = center + slice_offset + gen.uniform(-1.0, 1.0, rows * k) * spread / 4
    vals = gen.standard_normal(rows * k) * 10.0 ** np.clip(log_mag, -60.0, 30.0)
    vals[gen.random(rows * k) < zero_frac] = 0.0
    for s in zero_slices:
        vals[16 * s : 16 * (s + 1)] = 0.0
    for pos, v in specials:
        vals[pos] = v
    dtype_max = min(MAX_MAGNITUDE, float(torch.finfo(dtype).max))
    vals = np.clip(vals, -dtype_max, dtype_max).astype(F32)
    x = torch.from_numpy(vals).reshape(rows, k).to(dtype)

    kwargs: dict = {}
    if mode.endswith("axis0"):
        x = x.t().contiguous()  # the grouped axis (length k) is now axis 0
        kwargs["axis"] = 0
    if mode == "per_tensor":
        kwargs["per_tensor"] = True
    elif mode.startswith("g16"):
        kwargs["group_size"] = 16
    elif mode == "g32":
        kwargs["group_size"] = 32
    return x, kwargs


def _grouped(t: torch.Tensor, qt: F.QTensor) -> np.ndarray:
    return to_groups(t.numpy(), qt.group_size, qt.axis, qt.per_tensor)


def _effective_scale(qt: F.QTensor) -> np.ndarray:
    """The float multiplier of each group, broadcastable against the grouped layout ``[..., K/G, G]``."""
    if qt.fmt == "nvfp4":
        s = (qt.scales.float() * qt.tensor_scale).numpy().astype(np.float64)
    elif qt.fmt == "mxfp4":
        s = np.exp2(qt.scales.numpy().astype(np.float64) - 127)
    else:
        s = qt.scales.float().numpy().astype(np.float64)
    return s.reshape(1, 1, 1) if qt.per_tensor else s[..., None]


def _error_bound(fmt: str, qt: F.QTensor, xg: np.ndarray) -> np.ndarray:
    """Largest allowed ``|x - dequantize(qt)|`` (float32 result), per element, from the stored scales."""
    s = _effective_scale(qt)
    a = np.abs(xg.astype(np.float64))
    group_amax = a.max(axis=-1, keepdims=True)
    slop = FLOAT32_REL_SLOP * group_amax + DENORMAL_ABS
    if fmt in INT_RANGES:
        qmax = INT_RANGES[fmt][1]
        if INT_RANGES[fmt][2]:  # asymmetric: every x lies in [min, max], which the codes cover
            return INT_HALF_STEP * s + slop
        return INT_HALF_STEP * s + np.maximum(a - qmax * s, 0.0) + slop
    vmax, rel, sub_half = FLOAT_ELEMENT[fmt]
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.minimum(np.where(s > 0, a / np.where(s > 0, s, 1.0), 0.0), vmax)
    rounding = s * np.maximum(rel * v, sub_half)
    saturation = np.maximum(a - vmax * s, 0.0)  # also |x| itself where the scale is 0
    return rounding + saturation + slop


def _check_codes_in_range(fmt: str, qt: F.QTensor):
    if fmt in INT_RANGES:
        qmin, qmax, asym = INT_RANGES[fmt]
        assert qt.codes.dtype == (torch.uint8 if asym else torch.int8)
        assert int(qt.codes.min()) >= qmin and int(qt.codes.max()) <= qmax
        assert torch.isfinite(qt.scales).all() and (qt.scales >= 0).all()
        if asym:
            assert qt.zero_points.dtype == torch.uint8 and int(qt.zero_points.max()) <= qmax
    elif fmt.startswith("fp8"):
        b = qt.codes.view(torch.uint8) & 0x7F
        if fmt == "fp8_e4m3":
            assert not (b == 0x7F).any(), "E4M3 NaN code"
        else:
            assert not (b >= 0x7C).any(), "E5M2 Inf/NaN code"
        assert torch.isfinite(qt.scales).all()
    else:
        assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) <= 15
        if fmt == "nvfp4":
            assert qt.scales.dtype == torch.float8_e4m3fn
            sb = qt.scales.float()
            assert torch.isfinite(sb).all() and (sb >= 0).all()
            assert set(sb.unique().tolist()) <= set(E4M3_TABLE[np.isfinite(E4M3_TABLE)].tolist())
            assert qt.tensor_scale.dtype == torch.float32 and torch.isfinite(qt.tensor_scale)
        elif fmt == "mxfp4":
            assert qt.scales.dtype == torch.uint8 and not (qt.scales == 0xFF).any()
        else:
            assert torch.isfinite(qt.scales).all()


def _check_matches_reference(fmt: str, qt: F.QTensor, x: torch.Tensor):
    ref = reference_quantize(x.float().numpy(), fmt, qt.group_size, qt.axis, qt.per_tensor)
    codes = qt.codes.view(torch.uint8) if qt.codes.dtype != torch.uint8 else qt.codes
    np.testing.assert_array_equal(_grouped(codes, qt).astype(np.uint8), ref.codes, err_msg="codes")
    if fmt == "nvfp4":
        np.testing.assert_array_equal(qt.scales.view(torch.uint8).numpy(), ref.scales, err_msg="E4M3 scales")
        if ref.tensor_scale is not None:
            assert qt.tensor_scale.item() == ref.tensor_scale
    else:
        np.testing.assert_array_equal(qt.scales.numpy().reshape(ref.scales.shape), ref.scales, err_msg="scales")
    if ref.zero_points is not None:
        np.testing.assert_array_equal(qt.zero_points.numpy().reshape(ref.zero_points.shape), ref.zero_points)
    np.testing.assert_array_equal(_grouped(F.dequantize(qt), qt), ref.dequant, err_msg="dequantized values")


def _fake(x: torch.Tensor, fmt: str, kwargs: dict) -> torch.Tensor:
    return F.fake_quantize(
        x, fmt, kwargs.get("group_size"), kwargs.get("axis", -1), per_tensor=kwargs.get("per_tensor", False)
    )


@pytest.mark.parametrize("fmt", FORMATS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_format_properties(fmt, data):
    x, kwargs = data.draw(quant_case(fmt), label="x, kwargs")
    qt = F.quantize(x, fmt, **kwargs)
    fq = _fake(x, fmt, kwargs)

    # same shape and dtype, finite, and what quantize + dequantize gives
    assert fq.shape == x.shape and fq.dtype == x.dtype
    assert torch.isfinite(fq).all()
    assert torch.equal(fq, F.dequantize(qt, x.dtype))
    assert qt.codes.shape == x.shape

    _check_codes_in_range(fmt, qt)
    _check_matches_reference(fmt, qt, x)

    # error bound of the format (float32 dequantization), then including rounding to the input dtype
    deq = F.dequantize(qt)
    assert torch.isfinite(deq).all()
    xg = _grouped(x.float(), qt).astype(np.float64)
    bound = _error_bound(fmt, qt, xg)
    err = np.abs(_grouped(deq, qt).astype(np.float64) - xg)
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"
    rel_out, abs_out = OUTPUT_ROUNDING[x.dtype]
    err_out = np.abs(_grouped(fq.float(), qt).astype(np.float64) - xg)
    assert (err_out <= bound + rel_out * (np.abs(xg) + bound) + abs_out).all()

    # sign symmetry (the zero point breaks it for asymmetric formats)
    if fmt in SYMMETRIC:
        diff = (_fake(-x, fmt, kwargs).float() + fq.float()).abs()
        assert (diff <= BELOW_NORMAL_ABS).all()

    # two 4-bit codes per byte (flattened: with axis=0 the last dim may be odd)
    if fmt in FOUR_BIT:
        signed = qt.codes.dtype == torch.int8
        flat = qt.codes.reshape(-1)
        assert torch.equal(F.unpack_4bit(F.pack_4bit(flat), signed=signed), flat)

    # idempotence where it holds
    if fmt in IDEMPOTENT_EXACT:
        assert torch.equal(_fake(fq, fmt, kwargs), fq)
    elif fmt in IDEMPOTENT_APPROX and x.dtype == torch.float32:
        fq2 = _fake(fq, fmt, kwargs)
        assert ((fq2 - fq).abs() <= IDEMPOTENT_REL * fq.abs() + BELOW_NORMAL_ABS).all()


@st.composite
def normal_range_case(draw, fmt: str):
    """Float32 inputs whose scales and products stay in the float32 normal range for any 2^k, |k| <= 20."""
    rows = draw(st.integers(1, 3))
    k = draw(st.sampled_from([32, 64]))
    seed = draw(st.integers(0, 2**32 - 1))
    spread = draw(st.floats(0.0, 6.0))
    gen = np.random.default_rng(seed)
    vals = gen.standard_normal(rows * k) * 10.0 ** gen.uniform(-spread, spread, rows * k)
    vals[gen.random(rows * k) < 0.1] = 0.0
    x = torch.from_numpy(vals.astype(F32)).reshape(rows, k)
    group = None if fmt in BLOCK else draw(st.sampled_from([None, 16, 32]))
    return x, group, draw(st.integers(-20, 20))


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_power_of_two_scaling_commutes_with_fake_quantize(fmt, data):
    # every scale is derived from amax (or min/max), so x * 2^k quantizes to exactly 2^k times x^
    x, group, k = data.draw(normal_range_case(fmt), label="x, group, k")
    factor = 2.0**k
    assert torch.equal(F.fake_quantize(x * factor, fmt, group), F.fake_quantize(x, fmt, group) * factor)
