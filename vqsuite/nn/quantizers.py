"""Fake-quantizers used by the quantized modules: weights (per spec) and activations (dynamic or static).

Gradients pass straight through (STE): ``x + (Q(x) - x).detach()``, so calibration and fine-tuning can train
float master weights through the quantizer.
"""

from __future__ import annotations

import torch

from vqsuite.config import QuantSpec
from vqsuite.formats import fake_quantize, get_format
from vqsuite.formats.api import fake_quantize_static


def ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Forward ``xq``, backward identity (straight-through estimator)."""
    if x.requires_grad:
        return x + (xq - x).detach()
    return xq


def fake_quantize_weight(w_nk: torch.Tensor, spec: QuantSpec, name: str = "weight") -> torch.Tensor:
    """``w_nk: [N, K]`` -> fake-quantized ``[N, K]`` in ``w_nk.dtype`` (groups along K), with STE."""
    wq = fake_quantize(
        w_nk.detach(), spec.weight, spec.weight_group_size, -1, scale_dtype=spec.torch_scale_dtype, name=name
    )
    return ste(w_nk, wq)


def quantize_activation(
    x: torch.Tensor, spec: QuantSpec, static_scale: torch.Tensor | None = None, name: str = "input"
) -> torch.Tensor:
    """Fake-quantize activations ``x: [..., K]`` (groups along the last dim) as ``spec`` says; STE.

    An empty batch (``x.numel() == 0``, e.g. ``[0, K]``) is a valid forward: there is nothing to quantize and it is
    returned as is (the formats refuse empty tensors, which for a weight is a real error).
    """
    if spec.act is None or spec.act_mode == "none" or x.numel() == 0:
        return x
    xd = x.detach()
    if spec.act_mode == "static":
        if static_scale is None or not bool(torch.isfinite(static_scale).all()):
            raise RuntimeError(f"{name}: static activation scale is not calibrated; quantize with calib_data")
        xq = fake_quantize_static(xd, spec.act, static_scale)
    else:
        group = spec.act_group_size if spec.act_mode == "dynamic_per_group" else None
        xq = fake_quantize(xd, spec.act, group, -1, name=name)
    return ste(x, xq)


def static_scale_from_amax(amax: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """Per-tensor static scale that maps ``amax`` to the format's largest magnitude."""
    return (amax.float() / get_format(fmt_name).qmax).reshape(())
