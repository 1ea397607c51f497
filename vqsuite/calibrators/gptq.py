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
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from vqsuite.config import QuantSpec
from vqsuite.errors import ConfigError, UserError
from vqsuite.formats import QTensor, get_format, quantize
from vqsuite.formats.fp4 import E2M1_MAX, E4M3_MAX, block_scales_fp32, decode_e2m1, encode_e2m1
from vqsuite.formats.fp8 import FP8_DTYPES, cast_fp8_saturate

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

    def __init__(self, w: torch.Tensor, spec: QuantSpec) -> None:
        self.spec = spec
        self.fmt = get_format(spec.weight)
        n, k = w.shape
        self.group = spec.weight_group_size or k
        if k % self.group:
            raise ValueError(f"weight_group_size={self.group} must divide in_features={k}")
        self.n_groups = k // self.group
        self.tensor_scale: torch.Tensor | None = None
        if self.fmt.name == "nvfp4":  # the level-0 scale is fixed up front from the whole (unmodified) weight
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
) -> QTensor:
    """GPTQ-quantize ``w [N, K]`` for the loss ``tr((W - Ŵ) H (W - Ŵ)^T)``.

    hessian: ``[K, K]`` (``2 X^T X``, see :func:`hessian_from_inputs`; any positive scale works). Columns whose
    Hessian diagonal is 0 (inputs never seen non-zero) are set to 0 before quantization, as in GPTQ.
    Returns a :class:`QTensor` in the layout :func:`vqsuite.formats.quantize` gives for ``spec`` (codes
    ``[N, K]``, scales ``[N, K/G]`` in the spec's storage dtype). Runs on ``w``'s device: float32 sweep,
    float32 Hessian inverse (as GPTQ's and deepcompressor's kernels; ``hessian_dtype=torch.float64`` is more robust
    and ~1.5x slower on a CPU, where the three ``K³`` factorizations dominate GPTQ's cost at K = 12288).
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
    gq = _GroupQuantizer(W, spec)
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


def _codes_dtype(spec: QuantSpec) -> torch.dtype:
    fmt = get_format(spec.weight)
    if fmt.kind == "int":
        return torch.uint8 if fmt.asymmetric else torch.int8
    if fmt.name in FP8_DTYPES:
        return FP8_DTYPES[fmt.name]
    return torch.uint8
