"""Convolutions with TensorFlow-style dynamic "SAME" padding (EfficientNet ``tf_*`` ports, ViT hybrids, NFNets).

TF "SAME" pads each spatial dim by ``max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)`` for input size ``n``,
the smaller half before and the larger half after, so the output has ``ceil(n / s)`` positions. The amount
depends on the input size, which is why it cannot be a constructor's ``padding``: the layers here pad the input
at every call, then run a convolution with ``padding=0``.

``SamePadConv2d`` is the float layer (what a layer adapter turns a timm ``Conv2dSame`` into); ``QConv2dSame`` its
quantized twin, a :class:`~vqsuite.nn.QConv2d` with the same constructor and storage that pads first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqsuite.config import QuantSpec
from vqsuite.errors import UserError
from vqsuite.nn.conv import QConv2d

__all__ = ["QConv2dSame", "SamePadConv2d", "pad_same", "same_padding"]


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" padding of one spatial dim of length ``size``: ``(before, after)``, ``after - before`` in {0, 1}."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def pad_same(
    x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> torch.Tensor:
    """x: ``[..., H, W]`` -> ``[..., H + ph, W + pw]`` zero-padded so a conv with ``padding=0`` is TF "SAME"."""
    h, w = x.shape[-2:]
    top, bottom = same_padding(int(h), kernel_size[0], stride[0], dilation[0])
    left, right = same_padding(int(w), kernel_size[1], stride[1], dilation[1])
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom))


def _check_unpadded(padding: object, padding_mode: str, name: str) -> None:
    if padding_mode != "zeros" or padding not in (0, (0, 0), [0, 0]):
        raise UserError(
            f"{name} pads dynamically; it needs padding=0 and padding_mode='zeros', got {padding=} {padding_mode=}"
        )


class SamePadConv2d(nn.Conv2d):
    """Float ``nn.Conv2d`` with dynamic TF "SAME" padding: ``conv2d(pad_same(x), W, b, padding=0)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_unpadded(tuple(self.padding), self.padding_mode, type(self).__name__)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input: ``[B, C_in, H, W]`` -> ``[B, C_out, ceil(H / s), ceil(W / s)]``."""
        return super().forward(pad_same(input, self.kernel_size, self.stride, self.dilation))


class QConv2dSame(QConv2d):
    """Quantized :class:`SamePadConv2d`: ``QConv2d`` (padding 0) on the "SAME"-padded input.

    Padding with zeros before the activation quantizer changes nothing: a zero is a code in every format.
    """

    def __init__(self, *args, spec: QuantSpec | None = None, **kwargs) -> None:
        super().__init__(*args, spec=spec, **kwargs)
        _check_unpadded(self.padding, self.padding_mode, type(self).__name__)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input: ``[B, C_in, H, W]`` -> ``[B, C_out, ceil(H / s), ceil(W / s)]``."""
        return super().forward(pad_same(input, self.kernel_size, self.stride, self.dilation))
