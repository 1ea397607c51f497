"""The CPU family's ops, registered with ``torch.library`` (custom op + fake impl) so ``torch.compile`` traces a
frozen layer's forward as one opaque call per GEMM instead of breaking the graph. Eager calls skip the
``torch.library`` wrapper (``*_eager``: the same bodies), which costs more than the kernel itself at M=1.

    vqsuite::int4pack_linear(x [M, K] float, packed [N, K/2] uint8, scales_zeros [K/G, N, 2] bf16, G, N) -> [M, N]
        ``x`` is rounded to bf16 at the op boundary; ``torch.ops.aten._weight_int4pack_mm_for_cpu`` dequantizes
        ``w = (q - 8) * scale + zero`` per group in fp32 and accumulates in fp32; the result returns in x.dtype.
    vqsuite::int8pack_linear(x [M, K] float, w [N, K] int8, scales [N] bf16) -> [M, N]
        ``torch.ops.aten._weight_int8pack_mm`` on bf16 activations: ``y = (x @ w^T) * scales``.
    vqsuite::int8_int_mm(a [M, K] int8, w [N, K] int8) -> [M, N] int32
        exact int32 accumulation through ``torch._int_mm`` (oneDNN; fast with AVX512-VNNI/AMX only).
"""

from __future__ import annotations

import torch

#: the dtype the weight-only kernels' fast paths take (their fp32 paths are far slower on CPU: see BENCHMARKS.md)
KERNEL_DTYPE = torch.bfloat16


def int4pack_linear_eager(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, n: int
) -> torch.Tensor:
    """The op's body, called directly in eager mode (the ``torch.library`` wrapper costs ~60 us a call here)."""
    # the aten kernel needs a contiguous A; .to() keeps strides (a 1x1 conv's channels-last view, a transposed x)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE).contiguous(), packed, group, scales_zeros)
    return y.to(x.dtype)


def int8pack_linear_eager(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The op's body, called directly in eager mode."""
    return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE).contiguous(), w, scales).to(x.dtype)


@torch.library.custom_op("vqsuite::int4pack_linear", mutates_args=())
def int4pack_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, n: int
) -> torch.Tensor:
    return int4pack_linear_eager(x, packed, scales_zeros, group, n)


@int4pack_linear.register_fake
def _int4pack_linear_fake(x, packed, scales_zeros, group, n):  # noqa: ANN001, ANN202
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("vqsuite::int8pack_linear", mutates_args=())
def int8pack_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return int8pack_linear_eager(x, w, scales)


@int8pack_linear.register_fake
def _int8pack_linear_fake(x, w, scales):  # noqa: ANN001, ANN202
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("vqsuite::int8_int_mm", mutates_args=())
def int8_int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(a, w.t())


@int8_int_mm.register_fake
def _int8_int_mm_fake(a, w):  # noqa: ANN001, ANN202
    return a.new_empty((a.shape[0], w.shape[0]), dtype=torch.int32)
