"""Two 4-bit codes per byte: every byte value and every code pair, signed and unsigned, exactly."""

from __future__ import annotations

import itertools

import pytest
import torch

import vqsuite.formats as F

ALL_BYTES = torch.arange(256, dtype=torch.int32).to(torch.uint8)
UNSIGNED_CODES = list(range(16))
SIGNED_CODES = list(range(-8, 8))
FOUR_BIT_FORMATS = ["int4", "int4_asym", "fp4_e2m1", "nvfp4", "mxfp4"]


def _nibble_to_signed(n: int) -> int:
    """4-bit two's complement, written out by hand."""
    return n - 16 if n >= 8 else n


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_every_byte_unpacks_to_its_nibbles_and_packs_back(signed):
    codes = F.unpack_4bit(ALL_BYTES.reshape(1, 256), signed=signed)
    assert codes.shape == (1, 512)
    assert codes.dtype == (torch.int8 if signed else torch.uint8)
    lo_expected = [b & 0xF for b in range(256)]
    hi_expected = [b >> 4 for b in range(256)]
    if signed:
        lo_expected = [_nibble_to_signed(n) for n in lo_expected]
        hi_expected = [_nibble_to_signed(n) for n in hi_expected]
    # element 2i is the low nibble of byte i, element 2i + 1 the high nibble
    assert codes[0, 0::2].tolist() == lo_expected
    assert codes[0, 1::2].tolist() == hi_expected
    assert torch.equal(F.pack_4bit(codes), ALL_BYTES.reshape(1, 256))


@pytest.mark.parametrize(
    "signed, code_values", [(False, UNSIGNED_CODES), (True, SIGNED_CODES)], ids=["unsigned", "signed"]
)
def test_every_code_pair_roundtrips(signed, code_values):
    pairs = list(itertools.product(code_values, repeat=2))  # 16 x 16 = 256 (even, odd) pairs
    dtype = torch.int8 if signed else torch.uint8
    codes = torch.tensor(pairs, dtype=dtype)  # [256, 2]
    packed = F.pack_4bit(codes)
    assert packed.shape == (256, 1)
    assert packed.dtype == torch.uint8
    expected = [(a & 0xF) | ((b & 0xF) << 4) for a, b in pairs]
    assert packed.reshape(-1).tolist() == expected
    # all 256 pairs give all 256 distinct bytes
    assert len(set(expected)) == 256
    assert torch.equal(F.unpack_4bit(packed, signed=signed), codes)


@pytest.mark.parametrize("shape", [(2,), (3, 8), (2, 3, 64)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_roundtrip_any_leading_shape(shape, signed):
    gen = torch.Generator().manual_seed(0)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, shape, generator=gen).to(torch.int8 if signed else torch.uint8)
    packed = F.pack_4bit(codes)
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(F.unpack_4bit(packed, signed=signed), codes)


def test_pack_packs_along_last_dim_of_a_noncontiguous_view():
    codes = torch.arange(16, dtype=torch.uint8).reshape(4, 4).t()  # non-contiguous
    assert torch.equal(F.unpack_4bit(F.pack_4bit(codes)), codes)


@pytest.mark.parametrize(
    "codes, match",
    [
        (torch.zeros(3, dtype=torch.uint8), "even"),
        (torch.tensor([8, 0], dtype=torch.int8), r"\[-8, 7\]"),
        (torch.tensor([-9, 0], dtype=torch.int8), r"\[-8, 7\]"),
        (torch.tensor([16, 0], dtype=torch.uint8), r"\[0, 15\]"),
        (torch.tensor([1, 2], dtype=torch.int32), "int8 or uint8"),
        (torch.tensor([1.0, 2.0]), "int8 or uint8"),
    ],
    ids=["odd_last_dim", "int8_above_7", "int8_below_-8", "uint8_above_15", "int32_dtype", "float_dtype"],
)
def test_pack_rejects(codes, match):
    with pytest.raises(ValueError, match=match):
        F.pack_4bit(codes)


def test_unpack_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        F.unpack_4bit(torch.zeros(2, dtype=torch.int8))


@pytest.mark.parametrize("fmt", FOUR_BIT_FORMATS)
def test_quantized_codes_pack_roundtrip(fmt):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    codes = F.quantize(x, fmt).codes
    signed = codes.dtype == torch.int8
    assert torch.equal(F.unpack_4bit(F.pack_4bit(codes), signed=signed), codes)
