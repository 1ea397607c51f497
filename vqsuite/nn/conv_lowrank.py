"""Quantized convolutions with SVDQuant's 16-bit low-rank branch and per-input-channel smoothing.

Every quantized conv has a GEMM view ``W [N, K]`` (:mod:`vqsuite.nn.conv`); the branch is exact in that view,
``W·diag(λ_K) = proj_up @ proj_down^T + R`` with ``proj_down [K, r]``, ``proj_up [N, r]`` (the names and shapes
of :class:`~vqsuite.nn.QLinearLowRank`), and only the residual ``R`` is quantized.

* ``QConv{1,2,3}dLowRank`` (``N = O``, ``K = C·prod(k)``): the branch is a k×k conv to ``r`` channels
  (``proj_down`` as ``[r, C, *k]``, the layer's stride, padding, padding mode and dilation) followed by a 1×1 conv
  back to ``O`` channels (``proj_up`` as ``[O, r, 1, ...]``).
* ``QConvTranspose{1,2,3}dLowRank`` (``N = O·prod(k)``, ``K = C``): a 1×1 conv to ``r`` channels (``proj_down`` as
  ``[r, C, 1, ...]``) followed by a transposed conv back to ``O`` channels (``proj_up`` as ``[r, O, *k]``, the
  layer's stride, padding, output padding and dilation). Both factorings are exact because a conv is linear in its
  weight and the im2col/col2im maps do not depend on it.

Smoothing: ``smooth [C]`` is λ per input channel; the input is divided by it before the quantized residual and the
branch, and the GEMM columns are multiplied by it (repeated over the ``prod(k)`` taps of a conv's column block).
Folding ``1/λ`` into the previous layer is not done: the division is the layer's own (an elementwise op per call).

Only ``groups == 1`` convs take this class (a grouped conv's GEMM columns mix channels of different groups, so
neither a per-channel λ nor one branch fits); grouped convs stay plain :class:`~vqsuite.nn.QConv2d` & co.
The fake-quant and frozen forwards run the same ops (frozen: the dequantized residual through the layer's conv,
the branch convs in the input's dtype), so they agree bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vqsuite.config import QuantSpec
from vqsuite.errors import ConfigError
from vqsuite.nn.conv import (
    _CONV_FNS,
    _CONV_T_FNS,
    QConv1d,
    QConv2d,
    QConv3d,
    QConvBase,
    QConvNd,
    QConvTranspose1d,
    QConvTranspose2d,
    QConvTranspose3d,
    QConvTransposeNd,
)
from vqsuite.nn.linear import lowrank_factors


class _ConvLowRankState:
    """What the two low-rank conv families share: λ, the branch Parameters and the re-split of the weight."""

    rank: int

    def _init_lowrank(self, rank: int | None, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        layer: QConvBase = self  # type: ignore[assignment]
        name = type(self).__name__
        self.rank = int(layer.spec.rank if rank is None else rank)
        if layer.groups != 1:
            raise ConfigError(f"{name}: groups={layer.groups}: smoothing and the low-rank branch need groups=1")
        n, k = layer.gemm_shape
        if self.rank < 0 or self.rank > min(n, k):
            raise ConfigError(f"{name}: rank={self.rank} must lie in [0, min(N, K)={min(n, k)}] of the GEMM [{n}, {k}]")
        layer.register_buffer("smooth", torch.ones(layer.in_channels, device=device, dtype=dtype))
        if self.rank > 0:
            layer.proj_down = nn.Parameter(torch.zeros(k, self.rank, device=device, dtype=dtype))
            layer.proj_up = nn.Parameter(torch.zeros(n, self.rank, device=device, dtype=dtype))
        else:
            layer.register_parameter("proj_down", None)
            layer.register_parameter("proj_up", None)

    @property
    def taps(self) -> int:
        """GEMM columns per input channel: ``prod(kernel)`` for a conv, 1 for a transposed conv."""
        return 1 if isinstance(self, QConvTransposeNd) else math.prod(self.kernel_size)  # type: ignore[attr-defined]

    def gemm_smooth(self, smooth: torch.Tensor | None = None) -> torch.Tensor:
        """λ in the GEMM view: ``smooth [C]`` (default the layer's) -> ``[K]`` (each channel repeated per tap)."""
        lam = self.smooth if smooth is None else smooth  # type: ignore[attr-defined]
        return lam.repeat_interleave(self.taps) if self.taps > 1 else lam

    def _smoothed(self, x: torch.Tensor) -> torch.Tensor:
        """``x / λ`` along the channel dim of ``[B, C, *spatial]`` (or unbatched ``[C, *spatial]``)."""
        dims = self.dims  # type: ignore[attr-defined]
        return x / self.smooth.to(x.dtype).reshape(-1, *([1] * dims))  # type: ignore[attr-defined]

    @classmethod
    def _from_float_lowrank(cls, module: nn.Module, spec: QuantSpec, smooth: torch.Tensor | None, split: bool):
        q = super().from_float(module, spec)  # type: ignore[misc]
        if (
            split and module.weight.device.type != "meta"
        ):  # meta: structure only (quantized_structure), nothing to split
            q.set_smoothing_and_lowrank(smooth)
        return q

    @torch.no_grad()
    def set_smoothing_and_lowrank(self, smooth: torch.Tensor | None = None) -> None:
        """Re-split the float weight: GEMM ``W·diag(λ_K) = proj_up @ proj_down^T + R`` (float64 SVD), R stored.

        smooth: ``[C]`` positive λ per input channel, or ``None`` for ones. Fake-quant state only.
        """
        layer: QConvBase = self  # type: ignore[assignment]
        if layer.frozen:
            raise RuntimeError("set_smoothing_and_lowrank needs the float weight; the layer is frozen")
        w_full = self.float_gemm_weight().double()
        lam = torch.ones_like(layer.smooth, dtype=torch.float64) if smooth is None else smooth.double()
        if lam.shape != layer.smooth.shape or not bool((lam > 0).all()) or not bool(torch.isfinite(lam).all()):
            raise ValueError(f"smooth must be finite, positive and of shape {tuple(layer.smooth.shape)}")
        w_s = w_full * self.gemm_smooth(lam.to(w_full.device))
        if self.rank > 0:
            up, down = lowrank_factors(w_s, self.rank)
            layer.proj_up.copy_(up)
            layer.proj_down.copy_(down)
            w_s = w_s - layer.proj_up.double() @ layer.proj_down.double().t()
        layer.smooth.copy_(lam)
        layer.__dict__["_parameters"]["weight"].copy_(layer._from_gemm(w_s))

    @torch.no_grad()
    def set_lowrank_state(
        self, smooth: torch.Tensor, residual: torch.Tensor, up: torch.Tensor | None, down: torch.Tensor | None
    ) -> None:
        """Adopt a calibrator's split: ``smooth [C]``, GEMM residual ``[N, K]``, ``up [N, r]``, ``down [K, r]``."""
        layer: QConvBase = self  # type: ignore[assignment]
        param = layer.__dict__["_parameters"]["weight"]
        layer.smooth.copy_(smooth.to(layer.smooth.device))
        param.copy_(layer._from_gemm(residual.to(device=param.device, dtype=torch.float64)))
        if self.rank > 0:
            layer.proj_up.copy_(up)
            layer.proj_down.copy_(down)

    def float_gemm_weight(self) -> torch.Tensor:
        """The float weight this layer represents in the GEMM view, ``(R + proj_up @ proj_down^T) / λ_K``."""
        layer: QConvBase = self  # type: ignore[assignment]
        w = layer._to_gemm(layer.__dict__["_parameters"]["weight"]).double()
        if self.rank > 0:
            w = w + layer.proj_up.double() @ layer.proj_down.double().t()
        return (w / self.gemm_smooth().double()).to(layer.weight_dtype)

    def float_weight(self) -> torch.Tensor:
        """:meth:`float_gemm_weight` in the layer's own weight shape."""
        return self._from_gemm(self.float_gemm_weight())  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"  # type: ignore[misc]


class QConvNdLowRank(_ConvLowRankState, QConvNd):
    """``y = convNd(Q_a(x/λ), Q_w(R)) + conv1x1(convNd(x/λ, proj_down), proj_up) + b`` (``groups == 1``)."""

    _ctor_fields = (*QConvNd._ctor_fields, "rank")

    def __init__(self, *args, spec: QuantSpec | None = None, rank: int | None = None, **kwargs) -> None:
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        super().__init__(*args, spec=spec, **kwargs)
        self._init_lowrank(rank, device, dtype)

    @classmethod
    def from_float(
        cls, module: nn.Module, spec: QuantSpec, smooth: torch.Tensor | None = None, *, split: bool = True
    ) -> QConvNdLowRank:
        """The float conv split by a rank-``spec.rank`` SVD of ``W·diag(λ)`` (λ = ``smooth`` or ones); ``split=False``
        copies the float weight as is (λ = 1, zero branch) for a calibrator to fill (:meth:`set_lowrank_state`)."""
        return cls._from_float_lowrank(module, spec, smooth, split)

    def branch(self, x_hat: torch.Tensor) -> torch.Tensor:
        """The 16-bit branch of the smoothed input ``x_hat [B, C, *spatial]`` -> ``[B, O, *spatial']``."""
        r, d = self.rank, self.dims
        down = self.proj_down.to(x_hat.dtype).t().reshape(r, self.in_channels, *self.kernel_size)
        up = self.proj_up.to(x_hat.dtype).reshape(self.out_channels, r, *([1] * d))
        return _CONV_FNS[d](self._conv(x_hat, down, None, 1), up)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the float layer's own name
        """input: ``[B, C_in, *spatial]`` (or unbatched) -> ``[B, C_out, *spatial']``."""
        x_hat = self._smoothed(input)
        y = super().forward(x_hat)
        return y + self.branch(x_hat) if self.rank > 0 else y


class QConvTransposeNdLowRank(_ConvLowRankState, QConvTransposeNd):
    """``y = conv_transposeNd(Q_a(x/λ), Q_w(R)) + conv_transposeNd(conv1x1(x/λ, proj_down), proj_up) + b``."""

    _ctor_fields = (*QConvTransposeNd._ctor_fields, "rank")

    def __init__(self, *args, spec: QuantSpec | None = None, rank: int | None = None, **kwargs) -> None:
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        super().__init__(*args, spec=spec, **kwargs)
        self._init_lowrank(rank, device, dtype)

    @classmethod
    def from_float(
        cls, module: nn.Module, spec: QuantSpec, smooth: torch.Tensor | None = None, *, split: bool = True
    ) -> QConvTransposeNdLowRank:
        """The float transposed conv split by a rank-``spec.rank`` SVD of its GEMM view ``[O·prod(k), C]``
        (``split=False``: unsplit, as :meth:`QConvNdLowRank.from_float`)."""
        return cls._from_float_lowrank(module, spec, smooth, split)

    def branch(self, x_hat: torch.Tensor, output_padding: tuple[int, ...] | list[int]) -> torch.Tensor:
        """The 16-bit branch of the smoothed input ``x_hat [B, C, *spatial]`` -> ``[B, O, *spatial']``."""
        r, d = self.rank, self.dims
        down = self.proj_down.to(x_hat.dtype).t().reshape(r, self.in_channels, *([1] * d))
        # GEMM rows are (o, *k): proj_up [O·prod(k), r] -> [r, O, *k], the transposed conv's weight layout
        up = self.proj_up.to(x_hat.dtype).reshape(self.out_channels, *self.kernel_size, r).movedim(-1, 0)
        t = _CONV_FNS[d](x_hat, down)
        return _CONV_T_FNS[d](t, up, None, self.stride, self.padding, output_padding, 1, self.dilation)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:  # noqa: A002
        """input: ``[B, C_in, *spatial]`` (or unbatched) -> ``[B, C_out, *spatial']``."""
        x_hat = self._smoothed(input)
        y = super().forward(x_hat, output_size)
        if self.rank == 0:
            return y
        return y + self.branch(x_hat, self._resolved_output_padding(x_hat, output_size))


class QConv1dLowRank(QConvNdLowRank, QConv1d):
    """:class:`~vqsuite.nn.QConv1d` with smoothing and a low-rank branch."""

    dims = 1


class QConv2dLowRank(QConvNdLowRank, QConv2d):
    """:class:`~vqsuite.nn.QConv2d` with smoothing and a low-rank branch."""

    dims = 2


class QConv3dLowRank(QConvNdLowRank, QConv3d):
    """:class:`~vqsuite.nn.QConv3d` with smoothing and a low-rank branch."""

    dims = 3


class QConvTranspose1dLowRank(QConvTransposeNdLowRank, QConvTranspose1d):
    """:class:`~vqsuite.nn.QConvTranspose1d` with smoothing and a low-rank branch."""

    dims = 1


class QConvTranspose2dLowRank(QConvTransposeNdLowRank, QConvTranspose2d):
    """:class:`~vqsuite.nn.QConvTranspose2d` with smoothing and a low-rank branch."""

    dims = 2


class QConvTranspose3dLowRank(QConvTransposeNdLowRank, QConvTranspose3d):
    """:class:`~vqsuite.nn.QConvTranspose3d` with smoothing and a low-rank branch."""

    dims = 3


#: plain quantized conv class -> its low-rank twin
LOWRANK_CONV_TWINS: dict[type[QConvBase], type[QConvBase]] = {
    QConv1d: QConv1dLowRank,
    QConv2d: QConv2dLowRank,
    QConv3d: QConv3dLowRank,
    QConvTranspose1d: QConvTranspose1dLowRank,
    QConvTranspose2d: QConvTranspose2dLowRank,
    QConvTranspose3d: QConvTranspose3dLowRank,
}
#: float conv type -> its low-rank quantized twin
FLOAT_LOWRANK_CONV_TWINS: dict[type[nn.Module], type[QConvBase]] = {
    nn.Conv1d: QConv1dLowRank,
    nn.Conv2d: QConv2dLowRank,
    nn.Conv3d: QConv3dLowRank,
    nn.ConvTranspose1d: QConvTranspose1dLowRank,
    nn.ConvTranspose2d: QConvTranspose2dLowRank,
    nn.ConvTranspose3d: QConvTranspose3dLowRank,
}

__all__ = [
    "FLOAT_LOWRANK_CONV_TWINS",
    "LOWRANK_CONV_TWINS",
    "QConv1dLowRank",
    "QConv2dLowRank",
    "QConv3dLowRank",
    "QConvNdLowRank",
    "QConvTranspose1dLowRank",
    "QConvTranspose2dLowRank",
    "QConvTranspose3dLowRank",
    "QConvTransposeNdLowRank",
]
