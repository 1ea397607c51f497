"""FP8 E4M3 / E5M2: every code against a bit-level decoder, RNE casts, saturation, scales, reference match."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from formats_reference import E4M3, E4M3_TABLE, E5M2, E5M2_TABLE, F32, reference_quantize, round_to_minifloat, to_groups

import vqsuite.formats as F
from vqsuite.formats.fp8 import cast_fp8_saturate

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
FP8 = {
    "fp8_e4m3": (torch.float8_e4m3fn, E4M3, E4M3_TABLE, E4M3_MAX),
    "fp8_e5m2": (torch.float8_e5m2, E5M2, E5M2_TABLE, E5M2_MAX),
}
FMTS = list(FP8)
ALL_BYTES = torch.arange(256, dtype=torch.int32).to(torch.uint8)


def _torch_values(dtype: torch.dtype) -> np.ndarray:
    return ALL_BYTES.view(dtype).double().numpy()


# ----------------------------------------------------------------------------- every code


@pytest.mark.parametrize("fmt", FMTS)
def test_every_code_decodes_to_the_ocp_value(fmt):
    dtype, _, table, _ = FP8[fmt]
    got = _torch_values(dtype)
    np.testing.assert_array_equal(got, table)  # NaN positions compared too
    finite_or_inf = ~np.isnan(table)
    assert np.array_equal(np.signbit(got[finite_or_inf]), np.signbit(table[finite_or_inf]))  # -0.0 at 0x80


def test_e4m3_special_values():
    t = E4M3_TABLE
    assert np.flatnonzero(np.isnan(t)).tolist() == [0x7F, 0xFF]  # NaN only at S.1111.111
    assert not np.isinf(t).any()  # no Inf
    assert np.nanmax(t) == E4M3_MAX == t[0x7E] and -t[0xFE] == E4M3_MAX
    assert t[0x08] == 2.0**-6  # min normal
    assert t[0x01] == 2.0**-9  # min subnormal
    assert t[0x00] == 0.0 and np.signbit(t[0x80])
    assert torch.finfo(torch.float8_e4m3fn).max == E4M3_MAX


def test_e5m2_special_values():
    t = E5M2_TABLE
    assert np.flatnonzero(np.isinf(t)).tolist() == [0x7C, 0xFC]
    assert np.flatnonzero(np.isnan(t)).tolist() == [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]
    assert t[np.isfinite(t)].max() == E5M2_MAX == t[0x7B]
    assert t[0x04] == 2.0**-14  # min normal
    assert t[0x01] == 2.0**-16  # min subnormal
    assert torch.finfo(torch.float8_e5m2).max == E5M2_MAX


@pytest.mark.parametrize("fmt, qmax", [("fp8_e4m3", E4M3_MAX), ("fp8_e5m2", E5M2_MAX)])
def test_format_metadata(fmt, qmax):
    f = F.get_format(fmt)
    assert (f.bits, f.kind, f.qmax, f.qmin) == (8, "float", qmax, -qmax)


# ----------------------------------------------------------------------------- the cast


def _cast_probe_values(table: np.ndarray) -> np.ndarray:
    """Every finite code value, every midpoint between neighbours, and one float32 ulp either side of it."""
    finite = np.unique(table[np.isfinite(table)])
    mids = ((finite[1:] + finite[:-1]) / 2).astype(F32)
    assert np.array_equal(mids.astype(np.float64), (finite[1:] + finite[:-1]) / 2)  # midpoints are exact
    gen = np.random.default_rng(0)
    rand = np.concatenate([gen.standard_normal(20000) * s for s in (1e-3, 1.0, 100.0)])
    return np.concatenate(
        [finite, mids, np.nextafter(mids, F32(np.inf)), np.nextafter(mids, F32(-np.inf)), rand]
    ).astype(F32)


@pytest.mark.parametrize("fmt", FMTS)
def test_saturating_cast_is_round_to_nearest_even(fmt):
    dtype, mini, table, _ = FP8[fmt]
    v = _cast_probe_values(table)
    got = cast_fp8_saturate(torch.from_numpy(v), dtype).view(torch.uint8).numpy()
    np.testing.assert_array_equal(got, round_to_minifloat(v, mini, negative_zero=True))


OUT_OF_RANGE = [1.01, 1.5, 2.0, 1e6, 1e30, float(torch.finfo(torch.float32).max)]


@pytest.mark.parametrize("factor", OUT_OF_RANGE, ids=lambda f: f"{f:g}xmax")
@pytest.mark.parametrize("fmt", FMTS)
def test_saturating_cast_never_gives_inf_or_nan(fmt, factor):
    dtype, _, _, fmax = FP8[fmt]
    v = torch.tensor([fmax * factor, -fmax * factor]).clamp(
        -torch.finfo(torch.float32).max, torch.finfo(torch.float32).max
    )
    out = cast_fp8_saturate(v, dtype).float()
    assert out.tolist() == [fmax, -fmax]


# ----------------------------------------------------------------------------- quantize

GRANULARITIES = [
    ({"per_tensor": True}, "per_tensor"),
    ({"group_size": None}, "per_channel"),
    ({"group_size": 32}, "g32"),
    ({"group_size": 64}, "g64"),
    ({"group_size": 128}, "g128"),
    ({"group_size": 32, "axis": 0}, "g32_axis0"),
    ({"group_size": None, "axis": 0}, "per_channel_axis0"),
]


def _random(seed: int, shape=(64, 256)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    return x * 10.0 ** ((torch.rand(shape[0], 1, generator=gen) - 0.5) * 8)  # rows over 8 decades


@pytest.mark.parametrize("kwargs", [g for g, _ in GRANULARITIES], ids=[i for _, i in GRANULARITIES])
@pytest.mark.parametrize("fmt", FMTS)
def test_matches_reference_on_random_tensors(fmt, kwargs):
    x = _random(0)
    axis, per_tensor, g = kwargs.get("axis", -1), kwargs.get("per_tensor", False), kwargs.get("group_size")
    qt = F.quantize(x, fmt, **kwargs)
    ref = reference_quantize(x.numpy(), fmt, g, axis, per_tensor)
    assert qt.codes.dtype == FP8[fmt][0] and qt.codes.shape == x.shape
    codes = to_groups(qt.codes.view(torch.uint8).numpy(), g, axis, per_tensor).astype(np.uint8)
    np.testing.assert_array_equal(codes, ref.codes)
    np.testing.assert_array_equal(qt.scales.numpy().reshape(ref.scales.shape), ref.scales)
    deq = F.dequantize(qt)
    np.testing.assert_array_equal(to_groups(deq.numpy(), g, axis, per_tensor), ref.dequant)


@pytest.mark.parametrize("fmt", FMTS)
def test_scale_is_amax_over_max_and_amax_maps_to_max(fmt):
    _, _, _, fmax = FP8[fmt]
    x = _random(1, (8, 64))
    qt = F.quantize(x, fmt, group_size=32)
    assert qt.scales.shape == (8, 2) and qt.scales.dtype == torch.float32
    amax = x.abs().reshape(8, 2, 32).amax(-1)
    assert torch.equal(qt.scales, amax / fmax)
    vals = qt.codes.float().reshape(8, 2, 32)
    assert torch.equal(vals.abs().amax(-1), torch.full((8, 2), fmax))


@pytest.mark.parametrize("fmt", FMTS)
def test_saturates_when_a_16_bit_scale_rounds_down(fmt):
    # amax / max is ~1.4x the smallest float16 subnormal, so the stored scale rounds down to 2^-24 and
    # x / scale lands ~1.4x beyond the FP8 range: it must saturate, not become NaN (E4M3) or Inf (E5M2)
    _, _, _, fmax = FP8[fmt]
    amax = fmax * 1.4 * 2.0**-24
    x = torch.tensor([[amax, -amax, amax / 2, 0.0]])
    qt = F.quantize(x, fmt, scale_dtype=torch.float16)
    assert qt.scales.dtype == torch.float16 and qt.scales.item() == 2.0**-24
    assert qt.codes.float()[0, :2].tolist() == [fmax, -fmax]
    deq = F.dequantize(qt)
    assert torch.isfinite(deq).all()
    assert deq[0, :2].tolist() == [fmax * 2.0**-24, -fmax * 2.0**-24]


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fmt", FMTS)
def test_stored_16_bit_scale_is_the_one_used(fmt, scale_dtype):
    _, mini, _, _ = FP8[fmt]
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)) * 10  # scales well inside 16-bit range
    qt = F.quantize(x, fmt, scale_dtype=scale_dtype)
    assert qt.scales.dtype == scale_dtype
    s = qt.scales.float()
    expected = round_to_minifloat((x / s).numpy(), mini, negative_zero=True)
    np.testing.assert_array_equal(qt.codes.view(torch.uint8).numpy(), expected)
    assert torch.equal(F.dequantize(qt), qt.codes.float() * s)


@pytest.mark.parametrize("fmt", FMTS)
def test_all_zero_group(fmt):
    x = _random(3, (4, 64))
    x[2, 32:] = 0.0
    qt = F.quantize(x, fmt, group_size=32)
    assert qt.scales[2, 1].item() == 0.0
    assert torch.all(qt.codes[2, 32:].float() == 0)
    deq = F.dequantize(qt)
    assert torch.isfinite(deq).all() and torch.all(deq[2, 32:] == 0)


def test_group_whose_16_bit_scale_underflows_gets_zero_codes():
    # amax / 57344 is below half the smallest float16 subnormal: the stored scale is 0, so the codes must
    # be 0 too (not x / 1 cast to E5M2, which would be nonzero here)
    x = torch.tensor([[1e-3, -5e-4, 2e-4, 0.0]])
    qt = F.quantize(x, "fp8_e5m2", scale_dtype=torch.float16)
    assert qt.scales.item() == 0.0
    assert torch.all(qt.codes.float() == 0)
    assert torch.all(F.dequantize(qt) == 0)
