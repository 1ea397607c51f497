"""Bit-exact low-bit number formats: INT8, INT6, INT4 (sym/asym), INT3, INT2, mid-rise INT2..8 (OFQ's StatsQ grid),
FP8 E4M3/E5M2, FP4 E2M1, NVFP4, MXFP4.

Each format is a registered :class:`Format`; ``quantize``/``dequantize``/``fake_quantize`` dispatch by name,
``pack_4bit``/``unpack_4bit`` store two 4-bit codes per byte (INT3/INT2 codes use the same 4-bit container, INT6 a
byte: ``Format.storage_bits``).
"""

from __future__ import annotations

from vqsuite.formats import fp4, fp8, integer, midrise  # noqa: F401  (registers the formats)
from vqsuite.formats.api import dequantize, fake_quantize, quantize
from vqsuite.formats.base import Format, QTensor, get_format, list_formats, register_format
from vqsuite.formats.fp4 import decode_e2m1, e2m1_lut, encode_e2m1
from vqsuite.formats.packing import pack_4bit, unpack_4bit

__all__ = [
    "Format",
    "QTensor",
    "decode_e2m1",
    "dequantize",
    "e2m1_lut",
    "encode_e2m1",
    "fake_quantize",
    "get_format",
    "list_formats",
    "pack_4bit",
    "quantize",
    "register_format",
    "unpack_4bit",
]
