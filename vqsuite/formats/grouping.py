"""Reshaping a tensor into quantization groups along one axis, and back.

Every family quantizes the same way: move the grouped axis (K) last, view it as ``[..., K/G, G]``,
reduce over the last dim for the scale, and restore the original layout for the codes.
"""

from __future__ import annotations

import torch

from vqsuite.errors import ConfigError, UserError


def check_finite(x: torch.Tensor, name: str) -> None:
    """Formats refuse NaN/Inf input: a code for them would silently be wrong (documented policy)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise UserError(f"{name} holds non-finite values ({n_nan} NaN, {n_inf} Inf); refusing to quantize it")


def resolve_group_size(fmt_block: int | None, group_size: int | None, fmt_name: str) -> int | None:
    """Block formats fix their group; a different explicit group is an error, not a silent change."""
    if fmt_block is None:
        if group_size is not None and group_size <= 0:
            raise ConfigError(f"group_size={group_size} must be a positive integer or None (per channel)")
        return group_size
    if group_size is not None and group_size != fmt_block:
        raise ConfigError(f"group_size={group_size} is not allowed for {fmt_name}, whose blocks are {fmt_block} long")
    return fmt_block


def to_groups(x: torch.Tensor, group_size: int | None, axis: int, per_tensor: bool, name: str = "x") -> torch.Tensor:
    """View ``x`` as float32 groups.

    Returns ``[*lead, K // G, G]`` (``lead`` = the other dims of ``x`` in order, ``K = x.shape[axis]``,
    ``G = group_size or K``), or ``[1, numel]`` when ``per_tensor``.
    """
    if x.numel() == 0:
        raise UserError(f"{name} is empty (shape {tuple(x.shape)}); nothing to quantize")
    xf = x.float()
    if per_tensor:
        return xf.reshape(1, -1)
    if x.ndim == 0:
        raise UserError(f"{name} is 0-d: only per_tensor=True applies")
    if not -x.ndim <= axis < x.ndim:
        raise UserError(f"axis={axis} is out of range for {name} with {x.ndim} dims")
    xm = xf.movedim(axis, -1)
    k = xm.shape[-1]
    g = k if group_size is None else group_size
    if k % g != 0:
        raise ConfigError(f"group_size={g} must divide the length {k} of axis {axis} of {name}")
    return xm.reshape(*xm.shape[:-1], k // g, g)


def from_groups(yg: torch.Tensor, shape: torch.Size, axis: int, per_tensor: bool) -> torch.Tensor:
    """Inverse of :func:`to_groups`: back to ``shape`` with the grouped axis where it was."""
    if per_tensor:
        return yg.reshape(shape)
    moved = list(shape)
    k = moved.pop(axis if axis >= 0 else len(shape) + axis)
    moved.append(k)
    return yg.reshape(moved).movedim(-1, axis)


def store_scales(scale: torch.Tensor, scale_dtype: torch.dtype, name: str) -> torch.Tensor:
    """Round float32 scales to their storage dtype and return them as float32 again.

    The stored scale is the one used to divide, so dequantization inverts exactly it. A scale the storage
    dtype cannot hold (``amax / 127 > 65504`` in float16) is refused: stored as Inf it would dequantize to NaN.
    """
    stored = scale.to(scale_dtype)
    if not bool(torch.isfinite(stored).all()):
        raise UserError(
            f"{name}: a scale of {float(scale.max()):.6g} overflows scale_dtype={scale_dtype}; use a wider scale dtype"
        )
    return stored.float()


def group_scales_shape(scales: torch.Tensor, per_tensor: bool) -> torch.Tensor:
    """``[*lead, K/G, 1]`` -> stored shape ``[*lead, K/G]``, or a 0-d tensor per tensor."""
    return scales.reshape(()) if per_tensor else scales.squeeze(-1)


def expand_scales(scales: torch.Tensor, per_tensor: bool) -> torch.Tensor:
    """Stored scales -> broadcastable against ``[*lead, K/G, G]`` groups."""
    return scales.reshape(1, 1) if per_tensor else scales.unsqueeze(-1)
