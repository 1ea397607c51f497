"""Quantized convolutions with im2col-GEMM semantics.

``QConv2d``: weight ``[O, I/g, kh, kw]`` is the GEMM matrix ``[N = O, K = I/g * kh * kw]`` (K in PyTorch's
flatten order: input channel, then kernel row, then column), so weight groups run along input channels ×
kernel, as in an im2col GEMM. Depthwise and grouped convs included.

``QConvTranspose2d``: weight ``[I, O/g, kh, kw]``; the output is a sum over input channels, so the GEMM matrix
is ``[N = O * kh * kw, K = I/g]`` (rows ordered group, output channel, kernel row, column).

Activations are quantized per pixel ("token") across input channels: ``x [B, C, H, W]`` is viewed as
``[B, H, W, C]`` and grouped along C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from vqsuite.config import QuantSpec
from vqsuite.errors import UserError
from vqsuite.nn.base import QuantLayer, copy_float_params


def _conv_args(module: nn.Module) -> dict:
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": tuple(module.kernel_size),
        "stride": tuple(module.stride),
        "padding": module.padding if isinstance(module.padding, str) else tuple(module.padding),
        "dilation": tuple(module.dilation),
        "groups": module.groups,
        "bias": module.bias is not None,
        "padding_mode": module.padding_mode,
    }


class QConv2d(QuantLayer):
    """Quantized ``nn.Conv2d``: ``y = conv2d(Q_a(x), Q_w(W)) + b``."""

    _ctor_fields = (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "has_bias",
        "padding_mode",
    )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        spec: QuantSpec | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        spec = spec or QuantSpec()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.kernel_size = tuple(int(k) for k in self.kernel_size)
        self.padding = padding if isinstance(padding, str) else tuple(_pair(padding))
        self.padding_mode, self.has_bias = padding_mode, bool(bias)
        if in_channels % groups or out_channels % groups:
            raise UserError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if padding_mode != "zeros" and isinstance(self.padding, str):
            raise UserError(f"padding={padding!r} with padding_mode={padding_mode!r} is not supported")
        k = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        spec.validate_for(k, act_features=in_channels)
        super().__init__(
            spec,
            (out_channels, in_channels // groups, *self.kernel_size),
            (out_channels, k),
            out_channels if bias else None,
            device=device,
            dtype=dtype,
        )

    def _to_gemm(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(self.gemm_shape)

    def _from_gemm(self, w_nk: torch.Tensor) -> torch.Tensor:
        return w_nk.reshape(self.weight_shape)

    @classmethod
    def from_float(cls, module: nn.Conv2d, spec: QuantSpec) -> QConv2d:
        q = cls(**_conv_args(module), spec=spec, device=module.weight.device, dtype=module.weight.dtype)
        return copy_float_params(q, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, C_in, H, W]`` (or ``[C_in, H, W]``) -> ``[B, C_out, H', W']``."""
        xq = self.quantize_input(x, channel_dim=-3)
        w = self.effective_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            pad = [p for p in reversed(self.padding) for _ in range(2)]
            return F.conv2d(F.pad(xq, pad, mode=self.padding_mode), w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(xq, w, b, self.stride, self.padding, self.dilation, self.groups)


class QConvTranspose2d(QuantLayer):
    """Quantized ``nn.ConvTranspose2d``: ``y = conv_transpose2d(Q_a(x), Q_w(W)) + b``."""

    _ctor_fields = (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "output_padding",
        "groups",
        "has_bias",
        "dilation",
    )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        output_padding: int | tuple[int, int] = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | tuple[int, int] = 1,
        spec: QuantSpec | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        spec = spec or QuantSpec()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size = tuple(int(k) for k in _pair(kernel_size))
        self.stride, self.padding = tuple(_pair(stride)), tuple(_pair(padding))
        self.output_padding, self.dilation = tuple(_pair(output_padding)), tuple(_pair(dilation))
        self.has_bias = bool(bias)
        if in_channels % groups or out_channels % groups:
            raise UserError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        k = in_channels // groups
        spec.validate_for(k, act_features=in_channels)
        kh, kw = self.kernel_size
        super().__init__(
            spec,
            (in_channels, out_channels // groups, kh, kw),
            (out_channels * kh * kw, k),
            out_channels if bias else None,
            device=device,
            dtype=dtype,
        )

    def _to_gemm(self, w: torch.Tensor) -> torch.Tensor:
        g, (kh, kw) = self.groups, self.kernel_size
        i_g, o_g = self.in_channels // g, self.out_channels // g
        return w.reshape(g, i_g, o_g, kh, kw).permute(0, 2, 3, 4, 1).reshape(self.gemm_shape)

    def _from_gemm(self, w_nk: torch.Tensor) -> torch.Tensor:
        g, (kh, kw) = self.groups, self.kernel_size
        i_g, o_g = self.in_channels // g, self.out_channels // g
        return w_nk.reshape(g, o_g, kh, kw, i_g).permute(0, 4, 1, 2, 3).reshape(self.weight_shape)

    @classmethod
    def from_float(cls, module: nn.ConvTranspose2d, spec: QuantSpec) -> QConvTranspose2d:
        args = _conv_args(module)
        args.pop("padding_mode")
        args["output_padding"] = tuple(module.output_padding)
        q = cls(**args, spec=spec, device=module.weight.device, dtype=module.weight.dtype)
        return copy_float_params(q, module)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """x: ``[B, C_in, H, W]`` -> ``[B, C_out, H', W']``."""
        output_padding = self.output_padding
        if output_size is not None:
            output_padding = nn.ConvTranspose2d._output_padding(
                self,
                x,
                output_size,
                list(self.stride),
                list(self.padding),
                list(self.kernel_size),
                2,
                list(self.dilation),
            )
        xq = self.quantize_input(x, channel_dim=-3)
        w = self.effective_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv_transpose2d(xq, w, b, self.stride, self.padding, output_padding, self.groups, self.dilation)
