"""The kernel contract: a frozen quantized linear layer hands every ``qlinear`` kernel one small, frozen record of
tensors and format facts, never the module itself.

Kernels (reference, Triton, CPU) read only :class:`QLinearOperands`: they do not import ``vqsuite.nn``, read a
layer's ``spec`` or write caches into a module. A kernel family that wants its own weight layout declares a
``pack`` function (:class:`vqsuite.kernels.dispatch.KernelImpl`); the layer keeps what it returns as
non-persistent buffers (counted by :func:`vqsuite.module_nbytes`, absent from ``state_dict``) and hands it back
in :attr:`QLinearOperands.packed`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class QLinearOperands:
    """What a frozen ``QLinear``/``QLinearLowRank`` forward needs, for a GEMM weight ``[N, K]`` (groups along K).

    qweight: ``[N, K/2]`` uint8 (4-bit container) | ``[N, K]`` int8/uint8/float8 — as stored by ``freeze()``
    wscales: ``[N, K/G]`` float / float8_e4m3fn / uint8 E8M0; wzeros ``[N, K/G]`` uint8 (asymmetric); wtscale 0-d
    bias ``[N]``; smooth ``[K]`` (λ); proj_down ``[K, r]``; proj_up ``[N, r]``
    weight / weight_group_size: the stored format name and group (``None``: per channel)
    act / act_mode / act_group_size: the activation quantization (``act=None``: none, or the layer is observing)
    act_scale: the static activation scale for this call (0-d; a per-step table already resolved), else ``None``
    packed: a fast kernel's own weight layout (see the module docstring), ``None`` until packed
    """

    qweight: torch.Tensor
    wscales: torch.Tensor
    gemm_shape: tuple[int, int]
    weight: str
    weight_group_size: int | None = None
    wzeros: torch.Tensor | None = None
    wtscale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    smooth: torch.Tensor | None = None
    proj_down: torch.Tensor | None = None
    proj_up: torch.Tensor | None = None
    act: str | None = None
    act_mode: str = "none"
    act_group_size: int | None = None
    act_scale: torch.Tensor | None = None
    name: str = "qlinear"
    packed: dict[str, torch.Tensor] | None = None

    @property
    def rank(self) -> int:
        return 0 if self.proj_down is None else int(self.proj_down.shape[-1])

    def replace(self, **changes: object) -> QLinearOperands:
        return dataclasses.replace(self, **changes)


def as_operands(obj: object) -> QLinearOperands:
    """``obj`` if it is a :class:`QLinearOperands`, else the record a frozen layer builds for itself.

    Only for callers that hold a layer (tests, benchmarks): the dispatcher always passes the record.
    """
    if isinstance(obj, QLinearOperands):
        return obj
    build = getattr(obj, "qlinear_operands", None)
    if build is None:
        raise TypeError(f"expected QLinearOperands or a frozen quantized linear layer, got {type(obj).__name__}")
    return build()


def try_operands(obj: object) -> QLinearOperands | None:
    """:func:`as_operands`, or ``None`` when ``obj`` is a layer without packed storage (fake-quant, 16-bit)."""
    if isinstance(obj, QLinearOperands):
        return obj
    try:
        return as_operands(obj)
    except (RuntimeError, TypeError):
        return None
