"""Two 4-bit codes per byte.

Layout: along the last dim, element ``2i`` goes to the low nibble and ``2i + 1`` to the high nibble of byte
``i``. Signed INT4 codes are stored as their 4-bit two's complement; unpacking sign-extends them back.
"""

from __future__ import annotations

import torch


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` int8 (in [-8, 7]) or uint8 (in [0, 15]) codes -> ``[..., K/2]`` uint8."""
    if codes.shape[-1] % 2 != 0:
        raise ValueError(f"pack_4bit needs an even last dim, got shape {tuple(codes.shape)}")
    if codes.dtype == torch.int8:
        if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
            raise ValueError("signed 4-bit codes must lie in [-8, 7]")
        nib = codes.to(torch.int16).bitwise_and(0xF).to(torch.uint8)
    elif codes.dtype == torch.uint8:
        if codes.numel() and int(codes.max()) > 15:
            raise ValueError("unsigned 4-bit codes must lie in [0, 15]")
        nib = codes
    else:
        raise ValueError(f"pack_4bit takes int8 or uint8 codes, got {codes.dtype}")
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_4bit(packed: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """``[..., K/2]`` uint8 -> ``[..., K]`` codes: int8 in [-8, 7] if ``signed`` else uint8 in [0, 15]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_4bit takes uint8, got {packed.dtype}")
    lo = packed & 0xF
    hi = packed >> 4
    out = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        out = (out.to(torch.int16) - ((out >= 8).to(torch.int16) << 4)).to(torch.int8)
    return out
