"""FP4 E2M1 (every code, every tie, saturation) and the block formats NVFP4 and MXFP4 against the spec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from formats_reference import (
    E2M1_TABLE,
    E4M3_TABLE,
    F32,
    e2m1_codes,
    mx_scale_exponent,
    reference_quantize,
    to_groups,
)

import vqsuite.formats as F

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_TENSOR_DENOM = E2M1_MAX * E4M3_MAX  # 2688
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
E8M0_NAN = 0xFF
E8M0_BIAS = 127
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_MIN_SUBNORMAL = 2.0**-149
FLOAT32_MIN_NORMAL = 2.0**-126

# (input, expected E2M1 value) at every midpoint: a tie goes to the even code (mantissa bit 0)
E2M1_TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)]


def _f32(v: float) -> float:
    return float(np.float32(v))


def _next_up(v: float) -> float:
    return float(np.nextafter(F32(v), F32(np.inf)))


def _next_down(v: float) -> float:
    return float(np.nextafter(F32(v), F32(-np.inf)))


def _encode(values) -> torch.Tensor:
    return F.encode_e2m1(torch.tensor(values, dtype=torch.float32))


def _e2m1_value(values) -> list[float]:
    return F.decode_e2m1(_encode(values)).tolist()


# ----------------------------------------------------------------------------- E2M1 codes


def test_reference_decoder_gives_the_spec_magnitudes():
    # guards the test oracle itself: the bit-level decoder must reproduce the spec's table
    assert E2M1_TABLE[:8].tolist() == list(E2M1_MAGNITUDES)
    assert E2M1_TABLE[8:].tolist() == [-m for m in E2M1_MAGNITUDES]


@pytest.mark.parametrize("code", range(16), ids=[f"code{c:04b}" for c in range(16)])
def test_every_e2m1_code_decodes_to_its_exact_value(code):
    expected = E2M1_MAGNITUDES[code & 7] * (-1.0 if code & 8 else 1.0)
    got = F.decode_e2m1(torch.tensor([code], dtype=torch.uint8))
    assert got.dtype == torch.float32
    assert got.item() == expected
    assert math.copysign(1.0, got.item()) == math.copysign(1.0, E2M1_TABLE[code])  # code 8 is -0.0
    assert F.e2m1_lut()[code].item() == expected


def test_lut_matches_bit_level_decoder():
    assert torch.equal(F.e2m1_lut(), torch.tensor(E2M1_TABLE, dtype=torch.float32))


@pytest.mark.parametrize("code", [c for c in range(16) if c != 8], ids=lambda c: f"code{c:04b}")
def test_every_e2m1_value_encodes_to_its_code(code):
    assert _encode([E2M1_TABLE[code]]).item() == code


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos", "neg"])
@pytest.mark.parametrize("tie, expected", E2M1_TIES, ids=[f"tie_{t}->{e}" for t, e in E2M1_TIES])
def test_e2m1_tie_rounds_to_even(tie, expected, sign):
    assert _e2m1_value([sign * tie]) == [sign * expected]


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos", "neg"])
@pytest.mark.parametrize("tie", [t for t, _ in E2M1_TIES], ids=lambda t: f"mid_{t}")
def test_e2m1_just_off_a_tie_rounds_to_the_nearer_value(tie, sign):
    i = int(np.searchsorted(E2M1_MAGNITUDES, tie))
    lower, upper = E2M1_MAGNITUDES[i - 1], E2M1_MAGNITUDES[i]
    assert _e2m1_value([sign * _next_down(tie)]) == [sign * lower]
    assert _e2m1_value([sign * _next_up(tie)]) == [sign * upper]


SATURATING_INPUTS = [_next_up(6.0), 6.5, 7.0, 8.0, 100.0, 1e30, FLOAT32_MAX]


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos", "neg"])
@pytest.mark.parametrize("v", SATURATING_INPUTS, ids=lambda v: f"{v:g}")
def test_e2m1_saturates_at_6(v, sign):
    assert _encode([sign * v]).item() == (15 if sign < 0 else 7)
    assert _e2m1_value([sign * v]) == [sign * E2M1_MAX]


def test_e2m1_matches_brute_force_reference_on_random_values():
    gen = np.random.default_rng(0)
    grid = np.array(E2M1_MAGNITUDES)
    mids = (grid[1:] + grid[:-1]) / 2
    values = np.concatenate(
        [
            gen.uniform(-8, 8, 20000),
            gen.standard_normal(5000) * 3,
            grid,
            -grid,
            mids,
            -mids,
            np.nextafter(mids.astype(F32), F32(np.inf)),
            np.nextafter(mids.astype(F32), F32(-np.inf)),
            [1e-45, -1e-45, 1e-30, 1e30, -1e30],
        ]
    ).astype(F32)
    got = F.encode_e2m1(torch.from_numpy(values))
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), e2m1_codes(values))


# ----------------------------------------------------------------------------- library vs reference

REFERENCE_CASES = [
    ("fp4_e2m1", {"group_size": None}, "per_channel"),
    ("fp4_e2m1", {"group_size": 32}, "g32"),
    ("fp4_e2m1", {"per_tensor": True}, "per_tensor"),
    ("fp4_e2m1", {"group_size": 16, "axis": 0}, "g16_axis0"),
    ("nvfp4", {}, "blocks_along_K"),
    ("nvfp4", {"axis": 0}, "blocks_along_axis0"),
    ("mxfp4", {}, "blocks_along_K"),
    ("mxfp4", {"axis": 0}, "blocks_along_axis0"),
]


def _random_blocky(seed: int, shape=(32, 128), decades: float = 12.0) -> torch.Tensor:
    """Gaussian data with a per-16-slice magnitude spread over ``decades`` (block scales far apart)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    mag = 10.0 ** ((torch.rand(shape[0], shape[1] // 16, 1, generator=gen) - 0.5) * decades)
    return (x.reshape(shape[0], -1, 16) * mag).reshape(shape)


def _assert_matches_reference(x: torch.Tensor, fmt: str, kwargs: dict):
    qt = F.quantize(x, fmt, **kwargs)
    ref = reference_quantize(
        x.float().numpy(), fmt, kwargs.get("group_size"), kwargs.get("axis", -1), kwargs.get("per_tensor", False)
    )
    axis, per_tensor = kwargs.get("axis", -1), kwargs.get("per_tensor", False)
    codes = to_groups(qt.codes.numpy(), qt.group_size, axis, per_tensor).astype(np.uint8)
    np.testing.assert_array_equal(codes, ref.codes, err_msg="codes")
    if fmt == "nvfp4":
        assert qt.scales.dtype == torch.float8_e4m3fn
        np.testing.assert_array_equal(qt.scales.view(torch.uint8).numpy(), ref.scales, err_msg="E4M3 block scales")
        assert qt.tensor_scale.dtype == torch.float32 and qt.tensor_scale.shape == ()
        assert qt.tensor_scale.item() == ref.tensor_scale
    elif fmt == "mxfp4":
        assert qt.scales.dtype == torch.uint8
        np.testing.assert_array_equal(qt.scales.numpy(), ref.scales, err_msg="E8M0 scales")
    else:
        np.testing.assert_array_equal(qt.scales.numpy().reshape(ref.scales.shape), ref.scales, err_msg="scales")
    deq = to_groups(F.dequantize(qt).numpy(), qt.group_size, axis, per_tensor)
    np.testing.assert_array_equal(deq, ref.dequant, err_msg="dequantized values")


@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize(
    "fmt, kwargs", [c[:2] for c in REFERENCE_CASES], ids=[f"{c[0]}-{c[2]}" for c in REFERENCE_CASES]
)
def test_matches_reference_on_random_tensors(fmt, kwargs, seed):
    _assert_matches_reference(_random_blocky(seed), fmt, kwargs)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "nvfp4", "mxfp4"])
def test_matches_reference_on_exact_ties(fmt):
    # values that land exactly on E2M1 midpoints after scaling, in blocks whose amax is a power of two
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)  # amax 6 per 16 and per 32
    x = torch.stack([mids, -mids, mids * 2.0**-20, mids * 2.0**30])
    _assert_matches_reference(x, fmt, {})


# ----------------------------------------------------------------------------- NVFP4 scales


def test_nvfp4_two_level_scales():
    x = _random_blocky(3, shape=(8, 64), decades=4.0)
    qt = F.quantize(x, "nvfp4")
    amax = x.abs().max()
    s_t = amax / NVFP4_TENSOR_DENOM
    assert qt.tensor_scale.dtype == torch.float32 and qt.tensor_scale.shape == ()
    assert qt.tensor_scale.item() == s_t.item()  # bit-exact float32 amax / (6 * 448)
    assert qt.scales.shape == (8, 64 // NVFP4_BLOCK)
    assert qt.scales.dtype == torch.float8_e4m3fn
    block_amax = x.abs().reshape(8, -1, NVFP4_BLOCK).amax(-1)
    ratio = (block_amax / (E2M1_MAX * s_t)).numpy()
    e4m3_values = set(E4M3_TABLE[np.isfinite(E4M3_TABLE)].tolist())
    for s_b, r in zip(qt.scales.float().reshape(-1).tolist(), ratio.reshape(-1).tolist(), strict=True):
        assert s_b in e4m3_values
        # the stored scale is the nearest E4M3 value to amax_b / (6 s_t)
        finite = E4M3_TABLE[(E4M3_TABLE >= 0) & np.isfinite(E4M3_TABLE)]
        assert abs(s_b - r) == np.abs(finite - r).min()
    # the block holding the tensor amax gets the largest E4M3 scale, 448
    assert qt.scales.float().max().item() == E4M3_MAX


def test_nvfp4_all_zero_block_is_exact_zero():
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    x[1, 16:32] = 0.0
    qt = F.quantize(x, "nvfp4")
    assert qt.scales[1, 1].float().item() == 0.0
    assert torch.all(qt.codes[1, 16:32] == 0)
    deq = F.dequantize(qt)
    assert torch.all(deq[1, 16:32] == 0) and torch.isfinite(deq).all()


def test_nvfp4_block_whose_e4m3_scale_underflows_gets_zero_codes():
    # a block 1e-10 times the tensor amax: amax_b / (6 s_t) is below the smallest E4M3 subnormal (2^-9)
    x = torch.cat([torch.full((16,), 1e30), torch.linspace(-1e20, 1e20, 16)]).reshape(1, 32)
    qt = F.quantize(x, "nvfp4")
    assert qt.scales[0, 1].float().item() == 0.0
    assert torch.all(qt.codes[0, 16:] == 0), "a block with a zero scale must carry zero codes, not x/1 garbage"
    assert torch.all(F.dequantize(qt)[0, 16:] == 0)


def test_nvfp4_all_zero_tensor():
    qt = F.quantize(torch.zeros(2, 32), "nvfp4")
    assert torch.all(qt.codes == 0) and torch.all(qt.scales.float() == 0)
    assert torch.isfinite(qt.tensor_scale)
    deq = F.dequantize(qt)
    assert torch.all(deq == 0) and not torch.signbit(deq).any()


@pytest.mark.parametrize("group_size", [8, 32, 64], ids=lambda g: f"g{g}")
def test_nvfp4_rejects_other_group_sizes(group_size):
    with pytest.raises(ValueError, match=f"group_size={group_size}"):
        F.quantize(torch.randn(2, 64), "nvfp4", group_size=group_size)


@pytest.mark.parametrize("fmt, block", [("nvfp4", 16), ("mxfp4", 32)])
def test_block_formats_accept_their_own_block_and_reject_per_tensor(fmt, block):
    x = torch.randn(2, 64)
    assert F.quantize(x, fmt, group_size=block).group_size == block
    with pytest.raises(ValueError, match="per_tensor"):
        F.quantize(x, fmt, per_tensor=True)
    with pytest.raises(ValueError, match=f"group_size={block}"):
        F.quantize(torch.randn(2, block + block // 2), fmt)  # K not a multiple of the block


def test_block_formats_metadata():
    nv, mx = F.get_format("nvfp4"), F.get_format("mxfp4")
    assert (nv.block_size, nv.scale_kind, nv.tensor_scale) == (16, "e4m3", True)
    assert (mx.block_size, mx.scale_kind, mx.tensor_scale) == (32, "e8m0", False)
    assert nv.bits_per_element == 4.5 and mx.bits_per_element == 4.25


# ----------------------------------------------------------------------------- MXFP4 scales

MX_AMAX_CASES = [
    ("pow2_1", 1.0),
    ("pow2_8", 8.0),
    ("pow2_2^-10", 2.0**-10),
    ("pow2_2^100", 2.0**100),
    ("below_pow2_8", _next_down(8.0)),
    ("below_pow2_1", _next_down(1.0)),
    ("below_pow2_2^-100", _next_down(2.0**-100)),
    ("above_pow2_4", _next_up(4.0)),
    ("non_pow2_6", 6.0),
    ("non_pow2_0.3", _f32(0.3)),
    ("min_normal", FLOAT32_MIN_NORMAL),
    ("subnormal_1e-40", _f32(1e-40)),
    ("min_subnormal", FLOAT32_MIN_SUBNORMAL),
    ("pow2_2^-125", 2.0**-125),
    ("huge_1e30", _f32(1e30)),
    ("huge_2^127", 2.0**127),
    ("float32_max", FLOAT32_MAX),
]


@pytest.mark.parametrize("amax", [a for _, a in MX_AMAX_CASES], ids=[i for i, _ in MX_AMAX_CASES])
def test_mxfp4_scale_rule(amax):
    # one block whose largest magnitude is amax, plus smaller values
    x = torch.tensor([amax, -amax / 3, amax / 7, 0.0] * 8, dtype=torch.float32).reshape(1, MXFP4_BLOCK)
    assert x.abs().max().item() == amax
    qt = F.quantize(x, "mxfp4")
    byte = qt.scales.reshape(-1).item()
    assert byte != E8M0_NAN
    # spec: X = 2^(floor(log2 amax) - 2), exponent clamped to the E8M0 range
    exact_floor_log2 = math.frexp(amax)[1] - 1
    assert exact_floor_log2 == math.floor(math.log2(amax))  # frexp and log2 agree on these amax
    expected_exp = max(-127, min(127, exact_floor_log2 - 2))
    assert byte - E8M0_BIAS == expected_exp == mx_scale_exponent(amax)
    x_scale = 2.0**expected_exp
    if expected_exp > -127:
        assert 4.0 <= amax / x_scale < 8.0  # the spec's [4, 8) window: above 6 saturates
    deq = F.dequantize(qt)
    assert torch.isfinite(deq).all()
    expected_code = e2m1_codes(np.array([amax / x_scale]))[0]
    assert qt.codes[0, 0].item() == expected_code
    assert deq[0, 0].item() == E2M1_TABLE[expected_code] * x_scale


@pytest.mark.parametrize("amax", [_next_down(8.0), 7.0, 6.5], ids=["just_below_8", "7", "6.5"])
def test_mxfp4_values_above_6x_saturate(amax):
    x = torch.full((1, MXFP4_BLOCK), amax)
    x[0, 1] = -amax
    qt = F.quantize(x, "mxfp4")
    assert qt.scales.item() == E8M0_BIAS  # X = 2^0 since floor(log2 amax) = 2
    assert qt.codes[0, 0].item() == 7 and qt.codes[0, 1].item() == 15
    assert F.dequantize(qt)[0, :2].tolist() == [6.0, -6.0]


def test_mxfp4_all_zero_block():
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    x[0, 32:] = 0.0
    qt = F.quantize(x, "mxfp4")
    assert qt.scales.shape == (2, 2)
    assert qt.scales[0, 1].item() != E8M0_NAN
    assert torch.all(qt.codes[0, 32:] == 0)
    deq = F.dequantize(qt)
    assert torch.all(deq[0, 32:] == 0) and torch.isfinite(deq).all()


@pytest.mark.parametrize("k", [-30, -3, 1, 7, 40], ids=lambda k: f"x2^{k}")
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "fp4_e2m1"])
def test_power_of_two_scaling_is_exact(fmt, k):
    # scales derive from amax, so multiplying x by 2^k (no underflow/overflow) scales x^ by exactly 2^k
    x = _random_blocky(6, shape=(4, 64), decades=3.0)
    assert torch.equal(F.fake_quantize(x * 2.0**k, fmt), F.fake_quantize(x, fmt) * 2.0**k)


def test_fp4_e2m1_float_scale_is_amax_over_6():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    qt = F.quantize(x, "fp4_e2m1", group_size=32)
    assert qt.scales.shape == (3, 2)
    assert torch.equal(qt.scales, x.abs().reshape(3, 2, 32).amax(-1) / E2M1_MAX)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp4_e2m1_stored_scale_is_the_one_used(scale_dtype):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
    qt = F.quantize(x, "fp4_e2m1", group_size=32, scale_dtype=scale_dtype)
    assert qt.scales.dtype == scale_dtype
    s = qt.scales.float().unsqueeze(-1)
    expected = e2m1_codes((x.reshape(3, 2, 32) / s).numpy())
    np.testing.assert_array_equal(qt.codes.reshape(3, 2, 32).numpy(), expected)
    assert torch.equal(F.dequantize(qt), (F.decode_e2m1(qt.codes).reshape(3, 2, 32) * s).reshape(3, 64))
