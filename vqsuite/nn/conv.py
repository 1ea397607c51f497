"""Quantized convolutions (1-D, 2-D and 3-D, plain and transposed) with im2col-GEMM semantics.

``QConvNd`` (``QConv1d``, ``QConv2d``, ``QConv3d``): weight ``[O, I/g, *k]`` is the GEMM matrix
``[N = O, K = I/g * prod(k)]`` (K in PyTorch's flatten order: input channel, then each kernel dim in order), so
weight groups run along input channels × kernel, as in an im2col GEMM. Depthwise and grouped convs included.

``QConvTransposeNd`` (``QConvTranspose1d``, ``QConvTranspose2d``, ``QConvTranspose3d``): weight ``[I, O/g, *k]``;
the output is a sum over input channels, so the GEMM matrix is ``[N = O * prod(k), K = I/g]`` (rows ordered group,
output channel, then each kernel dim).

Activations are quantized per pixel/voxel ("token") across input channels: ``x [B, C, *spatial]`` is viewed as
``[B, *spatial, C]`` and grouped along C (``channel_dim = -(dims + 1)``, so unbatched inputs work too).

Each layer's ``forward`` takes the float layer's exact signature (``input``, and ``output_size`` for transposed
convs), so callers that pass keywords (``conv(input=x)``) work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd
from torch.nn.modules.utils import _ntuple

from vqsuite.config import QuantSpec
from vqsuite.errors import UserError
from vqsuite.nn.base import QuantLayer, copy_float_params

#: spatial dims -> torch's functional conv / transposed conv
_CONV_FNS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FNS: dict[int, Callable[..., torch.Tensor]] = {
    1: F.conv_transpose1d,
    2: F.conv_transpose2d,
    3: F.conv_transpose3d,
}


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


def _ints(value: int | tuple[int, ...], dims: int, name: str) -> tuple[int, ...]:
    """``value`` (an int or a ``dims``-tuple) as a ``dims``-tuple of ints; a tuple of another length is refused."""
    out = tuple(int(v) for v in _ntuple(dims)(value))
    if len(out) != dims:
        raise UserError(f"{name}={value!r} must be an int or {dims} ints for a {dims}-D convolution")
    return out


def _check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    if groups <= 0 or in_channels % groups or out_channels % groups:
        raise UserError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")


class QConvBase(QuantLayer):
    """What every quantized conv shares: ``dims`` spatial dims, activations per pixel/voxel across channels."""

    #: spatial dims (1, 2 or 3); set by each concrete class
    dims: int = 0

    @property
    def act_channel_dim(self) -> int:
        """Where the input channels sit in ``x [B, C, *spatial]`` (or unbatched ``[C, *spatial]``)."""
        return -(self.dims + 1)

    def _bias_for(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)


class QConvNd(QConvBase):
    """Quantized ``nn.Conv{1,2,3}d``: ``y = convNd(Q_a(x), Q_w(W)) + b``."""

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
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        spec: QuantSpec | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if type(self).dims not in _CONV_FNS:
            raise TypeError(f"{type(self).__name__} must set dims to one of {sorted(_CONV_FNS)}")
        d = self.dims
        spec = spec or QuantSpec()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size = _ints(kernel_size, d, "kernel_size")
        self.stride, self.dilation = _ints(stride, d, "stride"), _ints(dilation, d, "dilation")
        self.padding = padding if isinstance(padding, str) else _ints(padding, d, "padding")
        self.padding_mode, self.has_bias = padding_mode, bool(bias)
        _check_groups(self.in_channels, self.out_channels, self.groups)
        if padding_mode != "zeros" and isinstance(self.padding, str):
            raise UserError(f"padding={padding!r} with padding_mode={padding_mode!r} is not supported")
        k = in_channels // groups * math.prod(self.kernel_size)
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
    def from_float(cls, module: nn.Module, spec: QuantSpec) -> QConvNd:
        q = cls(**_conv_args(module), spec=spec, device=module.weight.device, dtype=module.weight.dtype)
        return copy_float_params(q, module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the float layer's own name
        """input: ``[B, C_in, *spatial]`` (or unbatched ``[C_in, *spatial]``) -> ``[B, C_out, *spatial']``."""
        xq = self.quantize_input(input, channel_dim=self.act_channel_dim)
        return self._conv(xq, self.effective_weight(input.dtype), self._bias_for(input), self.groups)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, groups: int) -> torch.Tensor:
        """This layer's convolution (stride, padding and padding mode, dilation) of ``x`` with any weight ``w``."""
        conv = _CONV_FNS[self.dims]
        if self.padding_mode != "zeros":
            pad = [p for p in reversed(self.padding) for _ in range(2)]
            return conv(F.pad(x, pad, mode=self.padding_mode), w, b, self.stride, 0, self.dilation, groups)
        return conv(x, w, b, self.stride, self.padding, self.dilation, groups)


class QConv1d(QConvNd):
    """Quantized ``nn.Conv1d``: weight ``[O, I/g, k]``, GEMM ``[O, I/g * k]``."""

    dims = 1


class QConv2d(QConvNd):
    """Quantized ``nn.Conv2d``: weight ``[O, I/g, kh, kw]``, GEMM ``[O, I/g * kh * kw]``."""

    dims = 2


class QConv3d(QConvNd):
    """Quantized ``nn.Conv3d``: weight ``[O, I/g, kd, kh, kw]``, GEMM ``[O, I/g * kd * kh * kw]``."""

    dims = 3


class QConvTransposeNd(QConvBase):
    """Quantized ``nn.ConvTranspose{1,2,3}d``: ``y = conv_transposeNd(Q_a(x), Q_w(W)) + b``."""

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
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] = 0,
        output_padding: int | tuple[int, ...] = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | tuple[int, ...] = 1,
        spec: QuantSpec | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if type(self).dims not in _CONV_T_FNS:
            raise TypeError(f"{type(self).__name__} must set dims to one of {sorted(_CONV_T_FNS)}")
        d = self.dims
        spec = spec or QuantSpec()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size = _ints(kernel_size, d, "kernel_size")
        self.stride, self.padding = _ints(stride, d, "stride"), _ints(padding, d, "padding")
        self.output_padding, self.dilation = _ints(output_padding, d, "output_padding"), _ints(dilation, d, "dilation")
        self.has_bias = bool(bias)
        _check_groups(self.in_channels, self.out_channels, self.groups)
        k = in_channels // groups
        spec.validate_for(k, act_features=in_channels)
        super().__init__(
            spec,
            (in_channels, out_channels // groups, *self.kernel_size),
            (out_channels * math.prod(self.kernel_size), k),
            out_channels if bias else None,
            device=device,
            dtype=dtype,
        )

    def _to_gemm(self, w: torch.Tensor) -> torch.Tensor:
        """``[I, O/g, *k]`` -> ``[g * O/g * prod(k), I/g]``."""
        g, d = self.groups, self.dims
        i_g, o_g = self.in_channels // g, self.out_channels // g
        perm = (0, *range(2, d + 3), 1)  # (g, o_g, *k, i_g)
        return w.reshape(g, i_g, o_g, *self.kernel_size).permute(perm).reshape(self.gemm_shape)

    def _from_gemm(self, w_nk: torch.Tensor) -> torch.Tensor:
        g, d = self.groups, self.dims
        i_g, o_g = self.in_channels // g, self.out_channels // g
        perm = (0, d + 2, *range(1, d + 2))  # (g, i_g, o_g, *k)
        return w_nk.reshape(g, o_g, *self.kernel_size, i_g).permute(perm).reshape(self.weight_shape)

    @classmethod
    def from_float(cls, module: nn.Module, spec: QuantSpec) -> QConvTransposeNd:
        if module.padding_mode != "zeros":  # torch's transposed convs accept only zeros too
            raise UserError(f"{type(module).__name__}: padding_mode={module.padding_mode!r} is not supported")
        args = _conv_args(module)
        args.pop("padding_mode")
        args["output_padding"] = tuple(module.output_padding)
        q = cls(**args, spec=spec, device=module.weight.device, dtype=module.weight.dtype)
        return copy_float_params(q, module)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:  # noqa: A002
        """input: ``[B, C_in, *spatial]`` (or unbatched) -> ``[B, C_out, *spatial']``; ``output_size`` picks the
        output padding as torch's transposed convs do."""
        output_padding = self._resolved_output_padding(input, output_size)
        xq = self.quantize_input(input, channel_dim=self.act_channel_dim)
        w = self.effective_weight(input.dtype)
        fn = _CONV_T_FNS[self.dims]
        return fn(xq, w, self._bias_for(input), self.stride, self.padding, output_padding, self.groups, self.dilation)

    def _resolved_output_padding(
        self,
        input: torch.Tensor,
        output_size: list[int] | None,  # noqa: A002
    ) -> tuple[int, ...] | list[int]:
        """The output padding of this call: the layer's own, or the one ``output_size`` asks for (as torch)."""
        if output_size is None:
            return self.output_padding
        return _ConvTransposeNd._output_padding(
            self,
            input,
            output_size,
            list(self.stride),
            list(self.padding),
            list(self.kernel_size),
            self.dims,
            list(self.dilation),
        )


class QConvTranspose1d(QConvTransposeNd):
    """Quantized ``nn.ConvTranspose1d``: weight ``[I, O/g, k]``, GEMM ``[O * k, I/g]``."""

    dims = 1


class QConvTranspose2d(QConvTransposeNd):
    """Quantized ``nn.ConvTranspose2d``: weight ``[I, O/g, kh, kw]``, GEMM ``[O * kh * kw, I/g]``."""

    dims = 2


class QConvTranspose3d(QConvTransposeNd):
    """Quantized ``nn.ConvTranspose3d``: weight ``[I, O/g, kd, kh, kw]``, GEMM ``[O * kd * kh * kw, I/g]``."""

    dims = 3


#: float conv type -> its quantized twin (the registry ``quantize_model`` and save/load build on)
CONV_TWINS: dict[type[nn.Module], type[QConvBase]] = {
    nn.Conv1d: QConv1d,
    nn.Conv2d: QConv2d,
    nn.Conv3d: QConv3d,
    nn.ConvTranspose1d: QConvTranspose1d,
    nn.ConvTranspose2d: QConvTranspose2d,
    nn.ConvTranspose3d: QConvTranspose3d,
}
#: every float conv type with a quantized twin (for ``isinstance`` checks)
FLOAT_CONV_TYPES: tuple[type[nn.Module], ...] = tuple(CONV_TWINS)
#: float transposed conv types
FLOAT_CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
