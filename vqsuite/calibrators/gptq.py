"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error onto
the columns not yet quantized through the inverse Hessian of the layer's reconstruction loss.

In SVDQuant it optionally quantizes the residual ``R = Ŵ - up @ down^T`` with the Hessian of the smoothed
input ``X̂`` (``gptq.yaml``: damp 0.01, block 128). The result is a :class:`vqsuite.formats.QTensor` — the codes
and scales GPTQ chose — which a layer stores as is with ``QuantLayer.freeze(qtensor)`` (or adopts with
``QuantLayer.set_pending_qtensor``): re-quantizing the dequantized GPTQ weight would not give the same codes.

Group scales (``scale_mode="dynamic"``, the default): a group's scale is computed when the column sweep enters
the group, from the weights as GPTQ has updated them so far (the GPTQ paper's grouping), exactly as the format
computes it (INT: ``amax/qmax`` rounded to the spec's scale dtype; NVFP4: the FP32 tensor scale is fixed up
front from the whole weight, the E4M3 block scales per 16 are computed on entry; MXFP4: E8M0 on entry).
Per-channel formats (INT8) have one group per row, so their scales are those of the unmodified weight.
``scale_mode="static"`` follows deepcompressor's kernel instead: every scale is computed up front from the
unmodified weight and the columns are swept in descending Hessian-diagonal order ("act order").

Layers (:func:`gemm_rows`, :class:`StreamingHessian`, :func:`gptq_layer`): a Linear's rows are its inputs; a
convolution's are its im2col rows. For ``ConvNd`` the GEMM view ``[O, I/g·prod(k)]`` is the im2col GEMM, so the
Hessian is ``2 X^T X`` over the unfolded input columns, one ``[I/g·prod(k)]²`` Hessian per group (depthwise:
``prod(k)``², tiny). For ``ConvTransposeNd`` the stored GEMM ``[O·prod(k), I/g]`` is followed by a col2im (fold)
that sums the products of different kernel taps into one output pixel, so the output error of output channel
``o`` couples all of its ``(tap, input channel)`` weights: the exact Hessian is over ``prod(k)·I/g`` columns
ordered (tap, channel), built from the rows of the equivalent convolution (each output pixel lists the input
values every tap brings to it). That view, ``[O, prod(k)·I/g]`` per group, reshapes to the stored GEMM view row
for row, and a stored group (a run of input channels of one tap) is a run of its columns, so GPTQ's codes and
scales need no reordering.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqsuite.config import QuantSpec
from vqsuite.errors import ConfigError, UserError
from vqsuite.formats import QTensor, get_format, quantize
from vqsuite.formats.fp4 import E2M1_MAX, E4M3_MAX, block_scales_fp32, decode_e2m1, encode_e2m1
from vqsuite.formats.fp8 import FP8_DTYPES, cast_fp8_saturate
from vqsuite.nn import FLOAT_CONV_TRANSPOSE_TYPES, FLOAT_CONV_TYPES, SamePadConv2d
from vqsuite.nn.conv_same import pad_same

logger = logging.getLogger(__name__)

#: ``gptq.yaml``: dampening as a fraction of the mean Hessian diagonal, and the lazy-update block width
DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128
#: when the damped Hessian is still not positive definite, add this fraction of the mean diagonal per retry
DAMP_RETRY_STEP = 0.001
MAX_CHOLESKY_TRIES = 200
ScaleMode = Literal["dynamic", "static"]


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``H = 2/M · X^T X`` in float64 from input rows ``x [..., K]`` (the ``2/M`` scale does not change GPTQ)."""
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    if rows.shape[0] == 0:
        raise ValueError("no input rows to build a Hessian from")
    return (rows.t() @ rows) * (2.0 / rows.shape[0])


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)^-1`` in ``H``'s dtype, retrying with more damping."""
    diag_mean = h.diagonal().mean()
    h = h.clone()
    h.diagonal().add_(damp * diag_mean)
    for tries in range(1, MAX_CHOLESKY_TRIES + 1):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            up, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                if tries > 1:
                    logger.debug("GPTQ Hessian needed %d dampening retries", tries - 1)
                return up
        h.diagonal().add_(DAMP_RETRY_STEP * diag_mean)
    raise RuntimeError(f"GPTQ: the Hessian is not positive definite after {MAX_CHOLESKY_TRIES} dampening retries")


class _GroupQuantizer:
    """Per-group scales computed on demand, and per-column quantization with them, for one format.

    All arithmetic matches :func:`vqsuite.formats.quantize` (float32 division, the format's own rounding), so
    ``dequantize`` of the assembled QTensor gives exactly the values GPTQ propagated errors for.
    """

    def __init__(self, w: torch.Tensor, spec: QuantSpec, tensor_scale: torch.Tensor | None = None) -> None:
        self.spec = spec
        self.fmt = get_format(spec.weight)
        n, k = w.shape
        self.group = spec.weight_group_size or k
        if k % self.group:
            raise ValueError(f"weight_group_size={self.group} must divide in_features={k}")
        self.n_groups = k // self.group
        self.tensor_scale: torch.Tensor | None = None
        if self.fmt.name == "nvfp4" and tensor_scale is not None:  # a whole layer's, when w is one of its groups
            self.tensor_scale = tensor_scale.float().reshape(())
        elif self.fmt.name == "nvfp4":  # the level-0 scale is fixed up front from the whole (unmodified) weight
            t = w.abs().amax().float() / (E2M1_MAX * E4M3_MAX)
            self.tensor_scale = torch.where(t == 0, torch.ones_like(t), t).reshape(())
        self.stored = [None] * self.n_groups  # stored scales per group, [N] each
        self.zeros = [None] * self.n_groups
        self.mult = [None] * self.n_groups  # float32 multiplier per group, [N]

    def set_group(self, g: int, wg: torch.Tensor) -> None:
        """Compute group ``g``'s scales from its current weights ``wg [N, G]``."""
        if self.fmt.name == "nvfp4":
            amax = wg.float().abs().amax(dim=1)
            s_b = cast_fp8_saturate(amax / (E2M1_MAX * self.tensor_scale), torch.float8_e4m3fn)
            self.stored[g] = s_b
            self.mult[g] = s_b.float() * self.tensor_scale
            return
        qt = quantize(wg, self.fmt, group_size=None, scale_dtype=self.spec.torch_scale_dtype, name="GPTQ group")
        self.stored[g] = qt.scales[:, 0]
        self.zeros[g] = None if qt.zero_points is None else qt.zero_points[:, 0]
        self.mult[g] = block_scales_fp32(qt)[:, 0] if self.fmt.name == "mxfp4" else qt.scales[:, 0].float()

    def quantize_column(self, col: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``col [N]`` float32 with group ``g``'s scales -> ``(codes [N], dequantized [N] float32)``."""
        s = self.mult[g]
        zero = s == 0
        safe = torch.where(zero, torch.ones_like(s), s)
        fmt = self.fmt
        if fmt.kind == "int":
            if fmt.asymmetric:
                z = self.zeros[g].float()
                q = (torch.round(col / safe) + z).clamp(fmt.qmin, fmt.qmax)
                return q.to(torch.uint8), (q - z) * s
            q = torch.round(col / safe).clamp(fmt.qmin, fmt.qmax)
            return q.to(torch.int8), q * s
        if fmt.name in FP8_DTYPES:
            codes = cast_fp8_saturate(torch.where(zero, torch.zeros_like(col), col / safe), FP8_DTYPES[fmt.name])
            return codes, codes.float() * s
        codes = torch.where(zero, 0, encode_e2m1(col / safe)).to(torch.uint8)  # E2M1 family
        return codes, decode_e2m1(codes) * s

    def assemble(self, codes: torch.Tensor) -> QTensor:
        per_channel = self.spec.weight_group_size is None
        zeros = None if self.zeros[0] is None else torch.stack(self.zeros, dim=1)
        return QTensor(
            codes=codes,
            scales=torch.stack(self.stored, dim=1),
            fmt=self.fmt.name,
            group_size=None if per_channel else self.group,
            axis=-1,
            per_tensor=False,
            zero_points=zeros,
            tensor_scale=self.tensor_scale,
        )


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK,
    scale_mode: ScaleMode = "dynamic",
    hessian_dtype: torch.dtype = torch.float32,
    tensor_scale: torch.Tensor | None = None,
) -> QTensor:
    """GPTQ-quantize ``w [N, K]`` for the loss ``tr((W - Ŵ) H (W - Ŵ)^T)``.

    hessian: ``[K, K]`` (``2 X^T X``, see :func:`hessian_from_inputs`; any positive scale works). Columns whose
    Hessian diagonal is 0 (inputs never seen non-zero) are set to 0 before quantization, as in GPTQ.
    Returns a :class:`QTensor` in the layout :func:`vqsuite.formats.quantize` gives for ``spec`` (codes
    ``[N, K]``, scales ``[N, K/G]`` in the spec's storage dtype). Runs on ``w``'s device: float32 sweep,
    float32 Hessian inverse (as GPTQ's and deepcompressor's kernels; ``hessian_dtype=torch.float64`` is more robust
    and ~1.5x slower on a CPU, where the three ``K³`` factorizations dominate GPTQ's cost at K = 12288).
    tensor_scale: NVFP4 only: the FP32 level-0 scale to use (a whole layer's, when ``w`` is one conv group of it);
    by default computed from ``w``.
    """
    if spec.weight is None:
        raise ConfigError("spec.weight is None: there is no weight format to GPTQ-quantize to")
    if w.ndim != 2:
        raise ValueError(f"w must be [N, K], got {tuple(w.shape)}")
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for w of shape {tuple(w.shape)}, got {tuple(hessian.shape)}")
    if not 0 <= damp:
        raise ConfigError(f"damp={damp} must be >= 0")
    if block_size < 1:
        raise ConfigError(f"block_size={block_size} must be >= 1")
    if scale_mode not in ("dynamic", "static"):
        raise ConfigError(f"scale_mode={scale_mode!r} must be 'dynamic' or 'static'")
    if not bool(torch.isfinite(w).all()):
        raise UserError("w holds non-finite values; refusing to quantize it")
    device = w.device
    W = w.detach().float().clone()
    H = hessian.detach().to(device=device, dtype=hessian_dtype).clone()
    dead = H.diagonal() == 0
    if bool(dead.any()):
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    gq = _GroupQuantizer(W, spec, tensor_scale)
    G = gq.group
    perm = None
    if scale_mode == "static":
        for g in range(gq.n_groups):
            gq.set_group(g, W[:, g * G : (g + 1) * G])
        perm = torch.argsort(H.diagonal(), descending=True)
        H = H[perm][:, perm]
        W = W[:, perm]
    hinv = _inverse_hessian_cholesky(H, damp).float()
    del H
    group_of = (perm if perm is not None else torch.arange(k, device=device)) // G
    group_of = group_of.tolist()
    codes = torch.empty(n, k, dtype=_codes_dtype(spec), device=device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if perm is None and c % G == 0:
                g_end = c + G
                # the group's current weights: in-block columns are up to date in w1; columns past the block
                # still owe the lazy update of this block's columns quantized so far
                cur = w1[:, i : min(g_end, i2) - i1]
                if g_end > i2:
                    rest = W[:, i2:g_end]
                    if i > 0:
                        rest = rest - err1[:, :i] @ hinv[i1 : i1 + i, i2:g_end]
                    cur = torch.cat([cur, rest], dim=1)
                gq.set_group(c // G, cur)
            col = w1[:, i]
            q, deq = gq.quantize_column(col, group_of[c])
            codes[:, c] = q
            e = (col - deq) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        if i2 < k:
            W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return gq.assemble(codes)


def _batched_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """:func:`_inverse_hessian_cholesky` for ``h [g, K, K]`` at once; a group that needs more damping retries alone."""
    diag_mean = h.diagonal(dim1=-2, dim2=-1).mean(-1)
    hd = h.clone()
    hd.diagonal(dim1=-2, dim2=-1).add_((damp * diag_mean).unsqueeze(-1))
    chol, info = torch.linalg.cholesky_ex(hd)
    up, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    for j in ((info != 0) | (info2 != 0)).nonzero().flatten().tolist():
        up[j] = _inverse_hessian_cholesky(h[j], damp)
    return up


@torch.no_grad()
def gptq_quantize_grouped(
    w: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK,
    scale_mode: ScaleMode = "dynamic",
    tensor_scale: torch.Tensor | None = None,
) -> QTensor:
    """GPTQ of ``w [g, O/g, K]`` where rows of group ``j`` have their own Hessian ``hessian[j] [K, K]`` (a grouped
    or depthwise conv), all groups swept together: the codes of :func:`gptq_quantize` run on each group in natural
    column order (``scale_mode="static"`` precomputes the scales but keeps that order: one column order serves all
    groups). Returns the QTensor of the ``[g·O/g, K]`` weight.
    """
    if spec.weight is None:
        raise ConfigError("spec.weight is None: there is no weight format to GPTQ-quantize to")
    g, o_g, k = w.shape
    if tuple(hessian.shape) != (g, k, k):
        raise ValueError(f"hessian must be [{g}, {k}, {k}] for w of shape {tuple(w.shape)}, got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise UserError("w holds non-finite values; refusing to quantize it")
    W3 = w.detach().float().clone()
    H = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = H.diagonal(dim1=-2, dim2=-1) == 0  # [g, K]
    if bool(dead.any()):
        H.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
        W3.masked_fill_(dead.unsqueeze(1), 0.0)
    n = g * o_g
    W = W3.view(n, k)
    gq = _GroupQuantizer(W, spec, tensor_scale)
    G = gq.group
    if scale_mode == "static":
        for gi in range(gq.n_groups):
            gq.set_group(gi, W[:, gi * G : (gi + 1) * G])
    hinv = _batched_inverse_cholesky(H, damp)
    del H
    codes = torch.empty(n, k, dtype=_codes_dtype(spec), device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = W[:, i1:i2].clone()
        w1g = w1.view(g, o_g, i2 - i1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if scale_mode == "dynamic" and c % G == 0:
                g_end = c + G
                cur = w1[:, i : min(g_end, i2) - i1]
                if g_end > i2:  # columns past the block still owe this block's lazy update
                    rest = W3[:, :, i2:g_end]
                    if i > 0:
                        rest = rest - torch.bmm(err1[:, :i].reshape(g, o_g, i), hinv[:, i1 : i1 + i, i2:g_end])
                    cur = torch.cat([cur, rest.reshape(n, -1)], dim=1)
                gq.set_group(c // G, cur)
            col = w1[:, i]
            q, deq = gq.quantize_column(col, c // G)
            codes[:, c] = q
            e = (col - deq) / h1[:, i, i].repeat_interleave(o_g)
            w1g[:, :, i:] -= e.view(g, o_g, 1) * h1[:, i, i:].unsqueeze(1)
            err1[:, i] = e
        if i2 < k:
            W3[:, :, i2:] -= torch.bmm(err1.view(g, o_g, i2 - i1), hinv[:, i1:i2, i2:])
    return gq.assemble(codes)


def _codes_dtype(spec: QuantSpec) -> torch.dtype:
    fmt = get_format(spec.weight)
    if fmt.kind == "int":
        return torch.uint8 if fmt.asymmetric else torch.int8
    if fmt.name in FP8_DTYPES:
        return FP8_DTYPES[fmt.name]
    return torch.uint8


# --------------------------------------------------------------------------- layers: GEMM rows and Hessians
#: a conv's im2col rows are built in batch chunks of at most this many elements (bounds the memory of one update)
ROWS_CHUNK_ELEMENTS = 1 << 24
GPTQ_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *FLOAT_CONV_TYPES)


def _check_layer(layer: nn.Module) -> None:
    if not isinstance(layer, GPTQ_LAYER_TYPES):
        raise UserError(f"GPTQ needs a Linear, ConvNd or ConvTransposeNd float layer, got {type(layer).__name__}")


def hessian_width(layer: nn.Module) -> tuple[int, int]:
    """``(groups, K')`` of ``layer``'s GPTQ view: a Linear ``(1, in_features)``, a conv ``(g, I/g·prod(k))`` (for a
    transposed conv ``prod(k)·I/g``, ordered tap then channel)."""
    _check_layer(layer)
    if isinstance(layer, nn.Linear):
        return 1, layer.in_features
    return layer.groups, layer.in_channels // layer.groups * math.prod(layer.kernel_size)


def weight_view(layer: nn.Module) -> torch.Tensor:
    """The float weight as GPTQ sees it: ``[g, O/g, K']`` float32 (a Linear: ``[1, N, K]``; a conv: its GEMM rows
    per group; a transposed conv ``[I, O/g, *k]``: ``[g, O/g, prod(k)·I/g]`` ordered (tap, input channel))."""
    g, kk = hessian_width(layer)
    w = layer.weight.detach().float()
    if isinstance(layer, nn.Linear):
        return w.unsqueeze(0)
    if isinstance(layer, FLOAT_CONV_TRANSPOSE_TYPES):
        i_g, o_g, p = layer.in_channels // g, layer.out_channels // g, math.prod(layer.kernel_size)
        return w.reshape(g, i_g, o_g, p).permute(0, 2, 3, 1).reshape(g, o_g, kk)
    return w.reshape(g, layer.out_channels // g, kk)


def weight_from_gemm(layer: nn.Module, w_nk: torch.Tensor) -> torch.Tensor:
    """A quantized layer's GEMM view ``[N, K]`` (``QuantLayer._to_gemm``'s layout) back in ``layer``'s weight shape."""
    _check_layer(layer)
    if isinstance(layer, FLOAT_CONV_TRANSPOSE_TYPES):
        g, k = layer.groups, tuple(layer.kernel_size)
        i_g, o_g = layer.in_channels // g, layer.out_channels // g
        perm = (0, len(k) + 2, *range(1, len(k) + 2))  # (g, o_g, *k, i_g) -> (g, i_g, o_g, *k)
        return w_nk.reshape(g, o_g, *k, i_g).permute(perm).reshape(layer.weight.shape)
    return w_nk.reshape(layer.weight.shape)


def _identity_kernel(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The weight whose conv (transposed conv) output channels are the layer's im2col rows, one per GPTQ column.

    Conv: ``[g·K', I/g, *k]``, output channel ``(group, i·prod(k) + tap)`` picks input channel ``i`` at ``tap``.
    Transposed conv: ``[I, g·K', *k]`` (``K' = prod(k)·I/g``), input channel ``i`` of a group sends tap ``t``'s
    contribution to output channel ``t·I/g + i`` of that group.
    """
    g, kk = hessian_width(layer)
    k = tuple(layer.kernel_size)
    p = math.prod(k)
    i_g = layer.in_channels // g
    if isinstance(layer, FLOAT_CONV_TRANSPOSE_TYPES):
        block = torch.zeros(i_g, p, i_g, p, dtype=dtype, device=device)
        for t in range(p):
            block[:, t, :, t] = torch.eye(i_g, dtype=dtype, device=device)
        return block.reshape(i_g, kk, *k).repeat(g, 1, *([1] * len(k)))
    eye = torch.eye(kk, dtype=dtype, device=device).reshape(kk, i_g, *k)
    return eye.repeat(g, *([1] * (len(k) + 1)))


def gemm_rows(layer: nn.Module, x: torch.Tensor, out_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The rows ``[g, M, K']`` of ``layer``'s GPTQ view for input ``x``: ``y = rows @ weight_view^T`` per group.

    Linear: ``x [..., K]`` -> ``[1, M, K]``. Conv: ``x [B, C, *spatial]`` -> the im2col rows, one per output
    pixel (``M = B·prod(out spatial)``); padding, ``padding_mode`` and dynamic "SAME" padding as the layer does
    them. Transposed conv: one row per output pixel, the input values each ``(tap, channel)`` brings to it, so
    ``rows @ weight_view^T`` is the float output without bias. ``out_shape``: the layer's actual output shape (a
    transposed conv called with ``output_size`` has an output padding of its own); by default the layer's.
    """
    _check_layer(layer)
    g, kk = hessian_width(layer)
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, kk).unsqueeze(0)
    dims = len(layer.kernel_size)
    if x.ndim == dims + 1:  # unbatched
        x = x.unsqueeze(0)
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    x = x.to(dtype)
    eye = _identity_kernel(layer, dtype, x.device)
    if isinstance(layer, FLOAT_CONV_TRANSPOSE_TYPES):
        op = tuple(layer.output_padding)
        if out_shape is not None:  # the output padding the call used (output_size) from the output it gave
            op = tuple(
                int(out_shape[-dims + j])
                - ((x.shape[-dims + j] - 1) * layer.stride[j] - 2 * layer.padding[j])
                - layer.dilation[j] * (layer.kernel_size[j] - 1)
                - 1
                for j in range(dims)
            )
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
        y = fn(x, eye, None, layer.stride, layer.padding, op, g, layer.dilation)
    else:
        if isinstance(layer, SamePadConv2d):
            x = pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
        y = layer._conv_forward(x, eye, None)
    b = y.shape[0]
    return y.reshape(b, g, kk, -1).permute(1, 0, 3, 2).reshape(g, -1, kk)


def _im2col_2d(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The im2col columns of a 2-D conv by ``F.unfold`` (a gather, no GEMM): ``[B, g·K', L]``, or ``None`` when the
    layer's padding is not a fixed amount (``padding="same"``: :func:`gemm_rows` handles it)."""
    if isinstance(layer.padding, str):
        return None
    pad = tuple(layer.padding)
    if isinstance(layer, SamePadConv2d):
        x = pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
    elif layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        pad = (0, 0)
    return F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=pad, stride=layer.stride)  # [B, C·P, L]


def _conv_transpose_out_spatial(layer: nn.Module, x: torch.Tensor, out_shape: tuple[int, ...] | None) -> list[int]:
    dims = len(layer.kernel_size)
    if out_shape is not None:
        return list(out_shape[-dims:])
    k, st, pd, dl, op = layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.output_padding
    return [(x.shape[-dims + j] - 1) * st[j] - 2 * pd[j] + dl[j] * (k[j] - 1) + op[j] + 1 for j in range(dims)]


def _conv_transpose_phase_rows(
    layer: nn.Module, x: torch.Tensor, out_shape: tuple[int, ...] | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rows of a transposed conv split by output phase: ``[(columns [c], rows [g, M_φ, c])]``.

    An output pixel ``q`` receives tap ``t`` from input ``(q + pad - t·dil) / stride`` when that is a whole number
    in range, so the pixels of one phase (``(q + pad) mod stride``, per dim) only ever see the taps of that phase:
    the Hessian is block-diagonal over phases, and each block is built from a gather of the input (no GEMM with an
    identity kernel), ``stride^dims`` times less work than :func:`gemm_rows`. ``columns``: the block's columns in
    the GPTQ view (tap, then input channel). The blocks' rows together are :func:`gemm_rows`'s, up to order and
    all-zero rows.
    """
    dims = len(layer.kernel_size)
    g, kk = hessian_width(layer)
    i_g = layer.in_channels // g
    k, st, pd, dl = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    in_sp = x.shape[-dims:]
    out_sp = _conv_transpose_out_spatial(layer, x, out_shape)
    xp = F.pad(x, (0, 1) * dims)  # index in_sp[j] of every spatial dim is a zero: taps that fall outside
    per_dim = []
    for j in range(dims):
        classes = []
        for phi in range(st[j]):
            qs = [q for q in range(out_sp[j]) if (q + pd[j]) % st[j] == phi]
            ts = [t for t in range(k[j]) if (t * dl[j]) % st[j] == phi]
            if not qs or not ts:
                continue
            idx = [
                [
                    (q + pd[j] - t * dl[j]) // st[j] if 0 <= q + pd[j] - t * dl[j] < in_sp[j] * st[j] else in_sp[j]
                    for t in ts
                ]
                for q in qs
            ]
            classes.append((ts, torch.tensor(idx, dtype=torch.long, device=x.device)))
        per_dim.append(classes)
    out = []
    for combo in itertools.product(*per_dim):
        r = xp
        for j, (_, idx) in enumerate(combo):
            dim = 2 + 2 * j  # earlier spatial dims are already (pixel, tap) pairs
            r = r.index_select(dim, idx.flatten()).unflatten(dim, tuple(idx.shape))
        # r: [B, C, Q1, T1, ..., Qd, Td] -> [g, B·Q1···Qd, T1···Td·I/g] (columns tap-major, as the GPTQ view)
        r = r.unflatten(1, (g, i_g))  # [B, g, I/g, Q1, T1, ...]: Q_j at 3 + 2j, T_j at 4 + 2j
        r = r.permute(1, 0, *[3 + 2 * j for j in range(dims)], *[4 + 2 * j for j in range(dims)], 2)
        n_taps = math.prod(len(c[0]) for c in combo)
        rows = r.reshape(g, -1, n_taps * i_g)
        taps = torch.zeros((), dtype=torch.long)
        for j, (ts, _) in enumerate(combo):  # flat tap index, row-major over the kernel dims
            taps = (taps * k[j]).unsqueeze(-1) + torch.tensor(ts, dtype=torch.long)
        cols = (taps.reshape(-1, 1) * i_g + torch.arange(i_g)).reshape(-1).to(x.device)
        out.append((cols, rows))
    return out


class StreamingHessian:
    """``H = 2/M · Σ rows^T rows`` of one float layer, summed over calls without keeping the rows.

    Each call's products are formed in float32 (float64 for float64 input) in batch chunks of at most
    :data:`ROWS_CHUNK_ELEMENTS` row elements and summed in float64. ``hessian()``: ``[g, K', K']`` float64.
    Rows come from the fast paths (``F.unfold`` for 2-D convs, phase blocks for transposed convs) where they
    apply, from :func:`gemm_rows` otherwise; ``fast=False`` always uses :func:`gemm_rows` (the twin the tests
    compare against).
    """

    def __init__(self, layer: nn.Module, *, fast: bool = True) -> None:
        self.layer = layer
        self.fast = fast
        self.groups, self.width = hessian_width(layer)
        self.sum: torch.Tensor | None = None
        self.rows = 0

    def _blocks(
        self, x: torch.Tensor, out_shape: tuple[int, ...] | None
    ) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        layer = self.layer
        if self.fast and isinstance(layer, FLOAT_CONV_TRANSPOSE_TYPES):
            return _conv_transpose_phase_rows(layer, x, out_shape)
        if self.fast and isinstance(layer, nn.Conv2d) and x.ndim == 4:
            cols = _im2col_2d(layer, x)
            if cols is not None:
                b, _, length = cols.shape
                cols = cols.view(b, self.groups, self.width, length)
                if self.width <= length:  # per-sample Grams straight from the unfold layout, no transpose copy
                    return [(None, cols)]
                return [(None, cols.permute(1, 0, 3, 2).reshape(self.groups, -1, self.width))]
        return [(None, gemm_rows(layer, x, out_shape))]

    @torch.no_grad()
    def add(self, x: torch.Tensor, out_shape: tuple[int, ...] | None = None) -> None:
        """Add the rows of one input ``x`` (the layer's forward input; ``out_shape`` its output's shape)."""
        x = x.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        if isinstance(self.layer, nn.Linear):
            chunks = [x.reshape(-1, self.width)]
        else:
            dims = len(self.layer.kernel_size)
            x = x.unsqueeze(0) if x.ndim == dims + 1 else x
            pixels = math.prod(out_shape[-dims:]) if out_shape is not None else math.prod(x.shape[-dims:])
            per_sample = max(1, self.groups * self.width * pixels)
            step = max(1, ROWS_CHUNK_ELEMENTS // per_sample)
            chunks = [x[i : i + step] for i in range(0, x.shape[0], step)]
        if self.sum is None:
            self.sum = torch.zeros(self.groups, self.width, self.width, dtype=torch.float64, device=x.device)
        for c in chunks:
            if c.numel() == 0:
                continue
            m = 0
            for cols, rows in self._blocks(c, out_shape):
                if rows.ndim == 4:  # im2col columns [B, g, K', L]
                    part = (rows @ rows.transpose(-1, -2)).sum(0).double()
                    self.sum.add_(part)
                    m += rows.shape[0] * rows.shape[3]
                    continue
                part = (rows.transpose(1, 2) @ rows).double()
                if cols is None:
                    self.sum.add_(part)
                else:
                    self.sum[:, cols.unsqueeze(1), cols.unsqueeze(0)] += part
                m += rows.shape[1]
            if self.fast and isinstance(self.layer, FLOAT_CONV_TRANSPOSE_TYPES):  # pixels no tap reaches count too
                m = c.shape[0] * math.prod(_conv_transpose_out_spatial(self.layer, c, out_shape))
            self.rows += m

    def hessian(self) -> torch.Tensor:
        if self.sum is None or self.rows == 0:
            raise ValueError("no input rows to build a Hessian from")
        return self.sum * (2.0 / self.rows)


@torch.no_grad()
def gptq_layer(
    layer: nn.Module,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK,
    scale_mode: ScaleMode = "dynamic",
) -> QTensor:
    """GPTQ of a float Linear/ConvNd/ConvTransposeNd with its Hessian ``[g, K', K']`` (:class:`StreamingHessian`).

    Returns the QTensor in the layout the quantized layer stores (codes ``[N, K]`` of its GEMM view, ``spec``'s
    format and group; see the module docstring for the transposed conv's mapping), for
    ``QuantLayer.set_pending_qtensor`` / ``freeze``. Each conv group is quantized with its own Hessian.
    """
    if spec.weight is None:
        raise ConfigError("spec.weight is None: there is no weight format to GPTQ-quantize to")
    g, kk = hessian_width(layer)
    if hessian.ndim == 2:
        hessian = hessian.unsqueeze(0)
    if tuple(hessian.shape) != (g, kk, kk):
        raise ValueError(f"hessian must be [{g}, {kk}, {kk}] for {type(layer).__name__}, got {tuple(hessian.shape)}")
    view = weight_view(layer)
    transposed = isinstance(layer, FLOAT_CONV_TRANSPOSE_TYPES)
    gspec = spec
    if transposed and spec.weight_group_size is None:  # one stored scale per (channel, tap) row: groups of I/g
        gspec = spec.replace(weight_group_size=layer.in_channels // g)
    tscale = None
    if get_format(spec.weight).name == "nvfp4":  # one level-0 scale for the whole layer, as the stored weight has
        t = view.abs().amax() / (E2M1_MAX * E4M3_MAX)
        tscale = torch.where(t == 0, torch.ones_like(t), t).reshape(())
    kw = {"damp": damp, "block_size": block_size, "scale_mode": scale_mode, "tensor_scale": tscale}
    if g == 1:
        parts = [gptq_quantize(view[0], hessian[0], gspec, **kw)]
    else:  # all groups in one sweep (a depthwise conv has hundreds of tiny ones)
        parts = [gptq_quantize_grouped(view, hessian, gspec, **kw)]
    n = view.shape[0] * view.shape[1]
    rows = n * math.prod(layer.kernel_size) if transposed else n
    codes = torch.cat([p.codes for p in parts]).reshape(rows, -1)
    scales = torch.cat([p.scales for p in parts]).reshape(rows, -1)
    zeros = None if parts[0].zero_points is None else torch.cat([p.zero_points for p in parts]).reshape(rows, -1)
    return QTensor(
        codes=codes,
        scales=scales,
        fmt=parts[0].fmt,
        group_size=spec.weight_group_size,
        axis=-1,
        per_tensor=False,
        zero_points=zeros,
        tensor_scale=parts[0].tensor_scale,
    )
