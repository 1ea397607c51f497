"""Number-format descriptions, the format registry and the quantized-tensor container.

A :class:`Format` is a frozen description (name, bits, integer or float, block size, scale format).
The arithmetic lives in one module per family (``integer.py``, ``fp8.py``, ``fp4.py``); each family
registers a quantize and a dequantize function for its formats here, and ``api.py`` dispatches by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from vqsuite.errors import ConfigError, UserError

ScaleKind = Literal["float", "e4m3", "e8m0"]


@dataclass(frozen=True)
class Format:
    """A low-bit number format.

    Attributes:
        name: registry name (``"int4"``, ``"nvfp4"``, ...).
        bits: bits per element code (the information content: ``int2`` is 2, ``int3`` is 3).
        kind: ``"int"`` or ``"float"``.
        qmin, qmax: smallest and largest code value (integers) or representable value (floats).
        asymmetric: integer formats with a zero point (codes ``[0, 2^bits - 1]``).
        block_size: fixed block length along K for block formats (NVFP4 16, MXFP4 32), else ``None``.
        scale_kind: how the per-group scale is stored: ``"float"`` (a float dtype chosen by the caller),
            ``"e4m3"`` (FP8 E4M3, NVFP4) or ``"e8m0"`` (power of two, MXFP4).
        tensor_scale: whether a per-tensor FP32 scale sits on top of the block scales (NVFP4).
        offset: integer formats whose levels sit between the integers: code ``q`` means ``(q + offset) · scale``
            (mid-rise grids, ``0.5``; :mod:`vqsuite.formats.midrise`); kernels that compute ``q · scale`` decline
            a format whose offset is not 0.
    """

    name: str
    bits: int
    kind: Literal["int", "float"]
    qmin: float
    qmax: float
    asymmetric: bool = False
    block_size: int | None = None
    scale_kind: ScaleKind = "float"
    tensor_scale: bool = False
    description: str = ""
    offset: float = 0.0

    @property
    def storage_bits(self) -> int:
        """Bits one code occupies in frozen storage: 4 (two codes per byte, :func:`pack_4bit`) for ``bits <= 4``,
        8 (one byte) for ``5 <= bits <= 8``. ``int2``/``int3`` codes live in the 4-bit container and ``int6`` in
        int8 bytes, so memory follows this, not :attr:`bits`."""
        if self.bits <= 4:
            return 4
        if self.bits <= 8:
            return 8
        raise ValueError(f"format {self.name!r}: bits={self.bits} has no storage container (at most 8)")

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element including block scales (not counting a per-tensor scale): the container's
        :attr:`storage_bits`, not the code's information content."""
        if self.block_size is None:
            return float(self.storage_bits)
        return self.storage_bits + 8.0 / self.block_size


@dataclass
class QTensor:
    """Result of :func:`vqsuite.formats.quantize`: codes plus everything needed to dequantize them.

    Shapes, for an input ``x`` whose grouped axis (``axis``) has length ``K`` and groups of ``G``:
        codes: same shape as ``x``. ``int8`` for signed integer formats, ``uint8`` for asymmetric integer
            formats and for FP4 (the 4-bit E2M1 bit pattern, unpacked), a ``torch.float8_*`` tensor for FP8.
        scales: ``x.movedim(axis, -1).shape[:-1] + (K // G,)`` for per-group/per-channel
            (per-channel is ``G = K``), a 0-d tensor for per-tensor. Float dtype, ``float8_e4m3fn`` (NVFP4)
            or ``uint8`` E8M0 biased exponents (MXFP4).
        zero_points: like ``scales``, ``uint8``, asymmetric integer formats only.
        tensor_scale: 0-d float32, NVFP4 only.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: str
    group_size: int | None
    axis: int = -1
    per_tensor: bool = False
    zero_points: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    def __iter__(self):
        # allows ``codes, scales, zeros = quantize(...)`` unpacking
        yield self.codes
        yield self.scales
        yield self.zero_points

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


QuantizeFn = Callable[..., QTensor]
DequantizeFn = Callable[[QTensor, torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class _Entry:
    fmt: Format
    quantize: QuantizeFn = field(repr=False)
    dequantize: DequantizeFn = field(repr=False)


_REGISTRY: dict[str, _Entry] = {}


def register_format(fmt: Format, quantize: QuantizeFn, dequantize: DequantizeFn) -> Format:
    """Add a format to the registry (an existing name is an error: formats are immutable)."""
    if fmt.name in _REGISTRY:
        raise UserError(f"format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = _Entry(fmt, quantize, dequantize)
    return fmt


def _entry(name: str | Format) -> _Entry:
    key = name.name if isinstance(name, Format) else name
    try:
        return _REGISTRY[key]
    except KeyError:
        raise ConfigError(f"unknown format {key!r}; known formats: {', '.join(sorted(_REGISTRY))}") from None


def get_format(name: str | Format) -> Format:
    """Look up a :class:`Format` by name; ``ConfigError`` (a ``ValueError``) naming the known formats otherwise."""
    return _entry(name).fmt


def list_formats() -> list[str]:
    return sorted(_REGISTRY)
