"""OFQ: oscillation-free quantization-aware training for vision transformers (METHODS.md §5).

Pieces:
- :class:`StatsQ`: weight quantizer with no learnable scale, ``s = 2·mean|W_row|`` at every bit width, mid-rise
  levels ``s·(k + ½)/n`` (``n = 2^{b-1}``, ``k = -n … n-1``), straight-through estimator.
- :class:`QATAttention`: timm's fused-qkv ``Attention`` rebuilt for QAT. With query-key reparameterization
  (QKR) each head's ``W_qk = W_qᵀ W_k: [C, C]`` is one StatsQ'd matrix and the logits are
  ``X̂ · LSQ(X̂ · Q(W_qk)ᵀ)ᵀ · d^{-½}``; the q/k biases are dropped (as the official code does).
  :class:`QATWindowAttention` does the same for Swin's ``WindowAttention`` and adds timm's relative-position bias
  and shifted-window mask. Which attention class gets which QAT module is a small registry of layer rules
  (:data:`ATTENTION_RULES`); other attention forms fall back to LSQ QAT of their Linears, with a log line.
- Confidence-guided annealing (CGA, :class:`CGA`): only weights whose pre-rounding value lies within
  ``±boundary`` of a rounding threshold are updated; the others get zero gradient and their values restored.
- An oscillation tracker per quantized weight (EMA of integer-level flips), reported per layer.
- :func:`ofq`: prepare, train with KD (CE + KL to the FP teacher), then CGA, with exact checkpoint/resume
  (safetensors + JSON, :mod:`vqsuite.finetune.checkpoint`: loading a checkpoint never runs code).

``method="lsq"`` gives the LSQ baseline (learnable per-row weight steps, no QKR, no CGA). The patch embedding and
the classifier head(s) are W8A8 LSQ in both. A trained QAT model becomes packed quantized layers (a checkpoint
``vqsuite.save_quantized`` writes) with :func:`vqsuite.finetune.freeze_qat`; without gradients the quantizers
compute their values plainly (no straight-through arithmetic), so the frozen model reproduces them bit for bit.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqsuite.errors import ConfigError, UserError
from vqsuite.finetune.checkpoint import (
    CheckpointError,
    pack,
    read_checkpoint,
    read_checkpoint_meta,
    unpack,
    write_checkpoint,
)
from vqsuite.finetune.lsq import LSQActQuantizer, LSQWeightQuantizer
from vqsuite.nn.quantizers import ste

logger = logging.getLogger(__name__)

#: StatsQ clamps W/s to [-1, 1 - STATSQ_EPS] so the top level stays 2^{b-1} - 1 (official code)
STATSQ_EPS = 1e-6
#: the CGA boundary half-width on the pre-rounding value (paper and code default)
CGA_BOUNDARY = 0.005
#: EMA momentum of the oscillation tracker (Nagel et al. TrackOscillation)
OSC_MOMENTUM = 0.01
#: a weight counts as oscillating when its flip EMA is at least this
OSC_THRESHOLD = 0.005
#: bit width of the patch embedding and the classifier head(s)
EDGE_BITS = 8
#: the ``format`` and ``version`` recorded in an OFQ checkpoint (safetensors + JSON metadata, no pickle)
OFQ_CHECKPOINT_FORMAT = "vqsuite-ofq-checkpoint"
OFQ_CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------- StatsQ
def statsq_scale(w: torch.Tensor) -> torch.Tensor:
    """``s = 2 · mean|W_row|`` (detached), shape ``[N, 1, ...]`` for ``w: [N, ...]``."""
    return 2 * w.detach().abs().reshape(w.shape[0], -1).mean(1).reshape(-1, *([1] * (w.ndim - 1)))


def statsq_preround(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The pre-rounding value ``z = n · clamp(W/s, -1, 1 - eps) - 0.5`` (``n = 2^{b-1}``); codes are ``round(z)``."""
    n = 2 ** (bits - 1)
    return n * torch.clamp(w / statsq_scale(w), -1.0, 1.0 - STATSQ_EPS) - 0.5


def statsq_codes(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels ``k ∈ [-2^{b-1}, 2^{b-1} - 1]`` of ``w`` (float tensor, same shape)."""
    return torch.round(statsq_preround(w.detach(), bits))


def statsq_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q(W) = s · (round(z) + 0.5) / n`` with the STE ``W + (Q(W) - W).detach()``; ``w: [N, ...]``."""
    n = 2 ** (bits - 1)
    q = statsq_scale(w) * (statsq_codes(w, bits) + 0.5) / n
    # no STE arithmetic without a gradient: the value is then exactly Q(W), what freeze_qat stores (int*_midrise)
    return ste(w, q) if torch.is_grad_enabled() else q


def cga_boundary_mask(w: torch.Tensor, bits: int, boundary: float = CGA_BOUNDARY) -> torch.Tensor:
    """True where ``z - i ∈ [0.5 - boundary, 0.5 + boundary]`` for an integer ``i`` (low confidence: trainable)."""
    z = statsq_preround(w.detach(), bits)
    return ((z - torch.floor(z)) - 0.5).abs() <= boundary


class OscillationTracker(nn.Module):
    """Per-weight EMAs of integer-level flips and of oscillations (Nagel et al.'s ``TrackOscillation``).

    A *flip* is any change of the integer level between two tracked steps; an *oscillation* is a flip whose
    direction reverses the weight's previous flip. Both EMAs use ``ema ← (1 - m)·ema + m·event``.
    """

    def __init__(self, shape: tuple[int, ...], momentum: float = OSC_MOMENTUM) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("prev_codes", torch.zeros(shape))
        self.register_buffer("prev_dir", torch.zeros(shape))
        self.register_buffer("flip_ema", torch.zeros(shape))
        self.register_buffer("osc_ema", torch.zeros(shape))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        if bool(self.started):
            d = torch.sign(codes - self.prev_codes)
            flips = d != 0
            osc = flips & (self.prev_dir != 0) & (d != self.prev_dir)
            self.flip_ema.mul_(1 - self.momentum).add_(self.momentum * flips.float())
            self.osc_ema.mul_(1 - self.momentum).add_(self.momentum * osc.float())
            self.prev_dir.copy_(torch.where(flips, d, self.prev_dir))
        self.prev_codes.copy_(codes)
        self.started.fill_(True)

    def summary(self, threshold: float = OSC_THRESHOLD) -> dict[str, float]:
        """``oscillating_fraction``: share of weights whose oscillation EMA is at least ``threshold``."""
        return {
            "flip_ema_mean": float(self.flip_ema.mean()),
            "osc_ema_mean": float(self.osc_ema.mean()),
            "oscillating_fraction": float((self.osc_ema >= threshold).float().mean()),
            "numel": self.flip_ema.numel(),
        }


class StatsQ(nn.Module):
    """StatsQ weight quantizer (no parameters) with an oscillation tracker for a weight of ``shape``."""

    def __init__(self, bits: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        if bits < 2:
            raise ConfigError(f"{bits=} must be >= 2 for StatsQ")
        self.bits = int(bits)
        self.tracker = OscillationTracker(tuple(shape))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return statsq_quantize(w, self.bits)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return statsq_codes(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class LSQWeight(LSQWeightQuantizer):
    """:class:`LSQWeightQuantizer` with an oscillation tracker (the LSQ baseline's and the 8-bit layers' weights).

    One step per row of the tensor it quantizes: ``shape[0]`` rows, or ``rows`` when the weight is quantized in
    another view than it is stored (QKR's ``W_qk: [H, C, C]`` as ``[H·C, C]``); the tracker follows ``shape``."""

    def __init__(self, bits: int, shape: tuple[int, ...], rows: int | None = None) -> None:
        super().__init__(bits, shape[0] if rows is None else rows)
        self.tracker = OscillationTracker(tuple(shape))


def _weight_quantizer(kind: str, bits: int, shape: tuple[int, ...], rows: int | None = None) -> nn.Module:
    if kind == "statsq":
        return StatsQ(bits, shape)
    if kind == "lsq":
        return LSQWeight(bits, shape, rows)
    raise ConfigError(f"weight quantizer {kind=} must be 'statsq' or 'lsq'")


# ---------------------------------------------------------------------------------------------------- layers
class QATLinear(nn.Module):
    """``y = Q_w(W) · A(x) + b`` for QAT; ``W: [out, in]``; ``A`` an LSQ input quantizer or identity."""

    def __init__(
        self, linear: nn.Linear, w_bits: int, a_bits: int | None, weight_quant: str = "statsq", *, act_signed=True
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.wq = _weight_quantizer(weight_quant, w_bits, tuple(self.weight.shape))
        self.aq = None if a_bits is None else LSQActQuantizer(a_bits, linear.in_features, signed=act_signed)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's signature (keyword callers)
        """input: ``[..., in]`` -> ``[..., out]``."""
        x = input if self.aq is None else self.aq(input)
        return F.linear(x, self.wq(self.weight), self.bias)


class QATConv2d(nn.Module):
    """LSQ-quantized Conv2d (the patch embedding): weight per output channel, input per channel."""

    def __init__(self, conv: nn.Conv2d, bits: int = EDGE_BITS) -> None:
        super().__init__()
        self.conv_kw = {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
        }
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.wq = LSQWeight(bits, tuple(self.weight.shape))
        self.aq = LSQActQuantizer(bits, conv.in_channels, signed=True)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Conv2d's signature (keyword callers)
        """input: ``[B, C, H, W]``."""
        x = self.aq(input.movedim(1, -1)).movedim(-1, 1)
        return F.conv2d(x, self.wq(self.weight), self.bias, **self.conv_kw)


def _head_dim(attn: nn.Module) -> int:
    """Channels per head of a fused-qkv attention (timm's ``WindowAttention`` has no ``head_dim`` attribute)."""
    hd = getattr(attn, "head_dim", None)
    return int(hd) if hd else attn.qkv.out_features // (3 * int(attn.num_heads))


class QATAttention(nn.Module):
    """timm ``Attention`` (fused ``qkv``) for QAT, with or without query-key reparameterization.

    Shapes: ``x: [B, N, C]``, ``H`` heads of ``d`` channels (``C/H`` unless the module says otherwise). QKR keeps
    ``w_qk: [H, C, C]`` (``W_q^hᵀ W_k^h``), ``v_weight: [H·d, C]``/``v_bias``; without QKR the fused ``qkv`` is a
    :class:`QATLinear` and q, k are LSQ'd. The softmax output is unsigned-LSQ'd and ``proj`` is a :class:`QATLinear`.
    Subclasses add to the logits through :meth:`bias_logits` (relative-position bias, window masks).
    Attention and projection dropout are not applied (the OFQ recipe trains without them).
    """

    def __init__(self, attn: nn.Module, bits: int, weight_quant: str = "statsq", qkr: bool = True) -> None:
        super().__init__()
        qkv: nn.Linear = attn.qkv
        self.num_heads, self.head_dim = int(attn.num_heads), _head_dim(attn)
        self.scale = float(getattr(attn, "scale", self.head_dim**-0.5))
        c, hd = qkv.in_features, self.num_heads * self.head_dim
        self.qkr = bool(qkr)
        self.in_q = LSQActQuantizer(bits, c, signed=True)
        if self.qkr:
            w = qkv.weight.detach()
            wq = w[:hd].reshape(self.num_heads, self.head_dim, c)
            wk = w[hd : 2 * hd].reshape(self.num_heads, self.head_dim, c)
            # W_qk^h[c, e] = Σ_d W_q^h[d, c] W_k^h[d, e]; q/k biases are dropped as in the official code
            self.w_qk = nn.Parameter(torch.einsum("hdc,hde->hce", wq.double(), wk.double()).to(w.dtype))
            # quantized per row of each head (the [H·C, C] view): LSQ learns H·C steps
            self.qk_wq = _weight_quantizer(weight_quant, bits, tuple(self.w_qk.shape), rows=self.num_heads * c)
            self.k_q = LSQActQuantizer(bits, None, signed=True)
            self.v_weight = nn.Parameter(w[2 * hd :].clone())
            self.v_bias = None if qkv.bias is None else nn.Parameter(qkv.bias.detach()[2 * hd :].clone())
            self.v_wq = _weight_quantizer(weight_quant, bits, tuple(self.v_weight.shape))
        else:
            self.qkv = QATLinear(qkv, bits, None, weight_quant)
            self.q_q = LSQActQuantizer(bits, None, signed=True)
            self.k_q = LSQActQuantizer(bits, None, signed=True)
        self.attn_q = LSQActQuantizer(bits, None, signed=False)
        self.proj = QATLinear(attn.proj, bits, bits, weight_quant)

    def qk_weight(self) -> torch.Tensor:
        """StatsQ'd ``W_qk: [H, C, C]`` (rows per head)."""
        h, c, _ = self.w_qk.shape
        wq = self.qk_wq(self.w_qk.reshape(h * c, c))
        return wq.reshape(h, c, c)

    def logits_and_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-softmax logits ``[B, H, N, N]`` (scaled, no bias) and values ``[B, H, N, d]`` of the input-quantized
        ``x: [B, N, C]``."""
        b, n, _ = x.shape
        if self.qkr:
            # X̂ · W_qkᵀ per head as one [H·C, C] linear (what the frozen model's QLinear computes): [B, H, N, C]
            h, c = self.num_heads, x.shape[-1]
            kk = self.k_q(F.linear(x, self.qk_weight().reshape(h * c, c)).reshape(b, n, h, c).transpose(1, 2))
            logits = torch.einsum("bnc,bhmc->bhnm", x, kk) * self.scale
            v = F.linear(x, self.v_wq(self.v_weight), self.v_bias)
            return logits, v.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_q(qkv[0]), self.k_q(qkv[1])
        return (q @ k.transpose(-2, -1)) * self.scale, qkv[2]

    def bias_logits(self, logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """What is added to ``logits: [B, H, N, N]`` before the softmax; plain self-attention takes no mask."""
        if mask is not None:
            raise NotImplementedError(f"{type(self).__name__} does not take an attention mask")
        return logits

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``[B, N, C]`` -> ``[B, N, C_out]``: logits, :meth:`bias_logits`, softmax, LSQ, values, ``proj``."""
        b, n, _ = x.shape
        logits, v = self.logits_and_values(self.in_q(x))
        attn = self.attn_q(self.bias_logits(logits, mask).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x: ``[B, N, C]`` -> ``[B, N, C_out]`` (timm ``Attention.forward``'s signature)."""
        if is_causal:
            raise NotImplementedError("QATAttention does not do causal attention")
        return self.attend(x, attn_mask)


class QATWindowAttention(QATAttention):
    """timm Swin ``WindowAttention`` (W-MSA / SW-MSA) for QAT: :class:`QATAttention`'s QKR logits plus the
    relative-position bias and, for shifted windows, the window mask, added exactly as timm does.

    Shapes: ``x: [nW·B, N, C]`` with ``N = Wh·Ww`` tokens per window; ``mask: [nW, N, N]`` (0 / -100) or ``None``;
    ``relative_position_bias_table: [(2Wh-1)(2Ww-1), H]`` (kept float, trainable) indexed by
    ``relative_position_index: [N, N]``. The logits are computed explicitly whatever timm's ``fused_attn`` says
    (``set_window_size`` is not supported after the swap).
    """

    def __init__(self, attn: nn.Module, bits: int, weight_quant: str = "statsq", qkr: bool = True) -> None:
        super().__init__(attn, bits, weight_quant, qkr)
        self.window_size = tuple(int(w) for w in attn.window_size)
        self.window_area = int(attn.window_area)
        self.relative_position_bias_table = nn.Parameter(attn.relative_position_bias_table.detach().clone())
        self.register_buffer("relative_position_index", attn.relative_position_index.clone(), persistent=False)

    def rel_pos_bias(self) -> torch.Tensor:
        """``[1, H, N, N]`` (timm ``WindowAttention._get_rel_pos_bias``)."""
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def bias_logits(self, logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        logits = logits + self.rel_pos_bias()
        if mask is not None:  # windows are batch-major: index nW·b + w carries mask[w]
            num_win, h, n = mask.shape[0], self.num_heads, logits.shape[-1]
            logits = (logits.view(-1, num_win, h, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, h, n, n)
        return logits

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``[nW·B, N, C]`` -> ``[nW·B, N, C]`` (timm ``WindowAttention.forward``'s signature)."""
        return self.attend(x, mask)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, num_heads={self.num_heads}, qkr={self.qkr}"


# ---------------------------------------------------------------------------------------------------- layer rules
def _is_timm_attention(m: nn.Module) -> bool:
    """timm ``Attention`` in the plain form QATAttention reproduces (no q/k norm, scale norm, gate or rel-pos bias)."""
    return (
        isinstance(getattr(m, "qkv", None), nn.Linear)
        and isinstance(getattr(m, "proj", None), nn.Linear)
        and hasattr(m, "num_heads")
        and hasattr(m, "head_dim")
        and isinstance(getattr(m, "q_norm", nn.Identity()), nn.Identity)
        and isinstance(getattr(m, "norm", nn.Identity()), nn.Identity)
        and getattr(m, "gate", None) is None
        and not hasattr(m, "relative_position_bias_table")
    )


def _is_timm_window_attention(m: nn.Module) -> bool:
    """timm Swin (v1) ``WindowAttention``: fused qkv, proj, rel-pos bias table and index."""
    return (
        isinstance(getattr(m, "qkv", None), nn.Linear)
        and isinstance(getattr(m, "proj", None), nn.Linear)
        and isinstance(getattr(m, "relative_position_bias_table", None), torch.Tensor)
        and isinstance(getattr(m, "relative_position_index", None), torch.Tensor)
        and hasattr(m, "num_heads")
        and hasattr(m, "window_area")
    )


@dataclass(frozen=True)
class AttentionRule:
    """How one attention class is rebuilt for QAT.

    ``accepts(module)`` checks that an instance has the form ``build`` reproduces (an instance with options the
    rule does not cover is rejected and falls back to LSQ); ``build(module, bits, weight_quant, qkr)`` returns the
    QAT module.
    """

    accepts: Callable[[nn.Module], bool]
    build: Callable[[nn.Module, int, str, bool], nn.Module]


#: layer rules keyed by the attention class's qualified name (``module.QualName``; timm is never imported here).
#: timm's ``Attention`` moved from ``timm.models.vision_transformer`` to ``timm.layers.attention`` in 1.0.
ATTENTION_RULES: dict[str, AttentionRule] = {
    "timm.layers.attention.Attention": AttentionRule(_is_timm_attention, QATAttention),
    "timm.models.vision_transformer.Attention": AttentionRule(_is_timm_attention, QATAttention),
    "timm.models.swin_transformer.WindowAttention": AttentionRule(_is_timm_window_attention, QATWindowAttention),
}


def attention_rule(m: nn.Module) -> AttentionRule | None:
    """The rule for ``m``'s class (or its nearest registered base class) if it accepts ``m``; else ``None``."""
    for cls in type(m).__mro__:
        rule = ATTENTION_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule if rule.accepts(m) else None
    return None


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def prepare_qat(model: nn.Module, bits: int, method: str = "ofq", *, qkr: bool | None = None) -> nn.Module:
    """Swap ``model``'s layers in place for QAT ones and return it.

    ``method="ofq"``: StatsQ weights (+ QKR unless ``qkr=False``); ``"lsq"``: LSQ weights. Attention modules are
    rebuilt by the rule :data:`ATTENTION_RULES` holds for their class: timm ``Attention`` (ViT, DeiT) becomes a
    :class:`QATAttention`, Swin's ``WindowAttention`` a :class:`QATWindowAttention`. Patch embedding conv and
    ``head``/``head_dist`` (``head.fc``) are W8A8 LSQ; every other Linear (Swin's ``reduction`` included) gets
    ``bits`` with an LSQ input quantizer (unsigned for an MLP's ``fc2``). Other attention forms (q/k norms, gates,
    Swin V2, ...) are not rebuilt: their Linears fall back to LSQ QAT and a line is logged (their softmax output
    stays unquantized).
    """
    if method not in ("ofq", "lsq"):
        raise ConfigError(f"{method=} must be 'ofq' or 'lsq'")
    wkind = "statsq" if method == "ofq" else "lsq"
    qkr = (method == "ofq") if qkr is None else qkr
    fallback: list[str] = []
    for name, m in list(model.named_modules()):
        rule = attention_rule(m) if name else None
        if rule is not None:
            _set(model, name, rule.build(m, bits, wkind, qkr))
        elif name and hasattr(m, "qkv") and hasattr(m, "proj"):
            logger.info("%s (%s): unsupported attention form, its Linears fall back to LSQ QAT", name, type(m).__name__)
            fallback.append(name + ".")
    for name, m in list(model.named_modules()):
        if not name:
            continue
        leaf = name.rpartition(".")[2]
        if isinstance(m, nn.Conv2d):
            _set(model, name, QATConv2d(m, EDGE_BITS))
        elif isinstance(m, nn.Linear):
            if leaf in ("head", "head_dist") or name.startswith("head."):
                _set(model, name, QATLinear(m, EDGE_BITS, EDGE_BITS, "lsq"))
            else:
                kind = "lsq" if any(name.startswith(p) for p in fallback) else wkind
                _set(model, name, QATLinear(m, bits, bits, kind, act_signed=leaf != "fc2"))
    model.vqsuite_qat = {"bits": bits, "method": method, "qkr": qkr}
    return model


def quantized_weights(model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Module]]:
    """Every QAT-quantized weight: name -> (parameter, its quantizer)."""
    out: dict[str, tuple[nn.Parameter, nn.Module]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QATLinear, QATConv2d)):
            out[f"{name}.weight"] = (m.weight, m.wq)
        elif isinstance(m, QATAttention) and m.qkr:
            out[f"{name}.w_qk"] = (m.w_qk, m.qk_wq)
            out[f"{name}.v_weight"] = (m.v_weight, m.v_wq)
    return out


def _codes(p: torch.Tensor, q: nn.Module) -> torch.Tensor:
    if p.ndim == 3:  # W_qk: rows of each head
        return q.codes(p.reshape(-1, p.shape[-1])).reshape(p.shape)
    return q.codes(p)


@torch.no_grad()
def track_oscillations(model: nn.Module) -> None:
    """Update every weight's flip EMA from its current integer levels (call after each optimizer step)."""
    for p, q in quantized_weights(model).values():
        q.tracker.update(_codes(p, q))


def oscillation_report(model: nn.Module, threshold: float = OSC_THRESHOLD) -> dict[str, dict[str, float]]:
    """Per quantized weight: mean flip/oscillation EMAs and the share with oscillation EMA ≥ ``threshold``.

    Keys are weight names plus ``"total"`` (numel-weighted over all of them).
    """
    rep = {n: q.tracker.summary(threshold) for n, (_, q) in quantized_weights(model).items()}
    tot = sum(r["numel"] for r in rep.values())
    if tot:
        rep["total"] = {
            "flip_ema_mean": sum(r["flip_ema_mean"] * r["numel"] for r in rep.values()) / tot,
            "osc_ema_mean": sum(r["osc_ema_mean"] * r["numel"] for r in rep.values()) / tot,
            "oscillating_fraction": sum(r["oscillating_fraction"] * r["numel"] for r in rep.values()) / tot,
            "numel": tot,
        }
    return rep


# ---------------------------------------------------------------------------------------------------- CGA
class CGA:
    """Confidence-guided annealing over the StatsQ weights of a prepared model.

    ``mask_gradients()`` after ``backward()`` computes each weight's boundary mask (from the values before the
    step), zeroes the gradient outside it and remembers the values; ``restore()`` after ``optimizer.step()``
    puts the frozen values back (AdamW's decay and momentum would move them otherwise).
    """

    def __init__(self, model: nn.Module, boundary: float = CGA_BOUNDARY) -> None:
        self.boundary = float(boundary)
        self.params = [(p, q.bits, p.ndim == 3) for p, q in quantized_weights(model).values() if isinstance(q, StatsQ)]
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def mask_of(self, p: torch.Tensor, bits: int, per_head: bool) -> torch.Tensor:
        w = p.detach().reshape(-1, p.shape[-1]) if per_head else p.detach()
        return cga_boundary_mask(w, bits, self.boundary).reshape(p.shape)

    @torch.no_grad()
    def mask_gradients(self) -> float:
        """Zero gradients outside the boundary; returns the trainable fraction."""
        self._saved, n_in, n = [], 0, 0
        for p, bits, per_head in self.params:
            mask = self.mask_of(p, bits, per_head)
            if p.grad is not None:
                p.grad.mul_(mask)
            self._saved.append((mask, p.detach().clone()))
            n_in, n = n_in + int(mask.sum()), n + mask.numel()
        return n_in / max(n, 1)

    @torch.no_grad()
    def restore(self) -> None:
        for (p, _, _), (mask, old) in zip(self.params, self._saved, strict=True):
            p.copy_(torch.where(mask, p, old))
        self._saved = []


# ---------------------------------------------------------------------------------------------------- training
def kd_loss(
    logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 1.0,
) -> torch.Tensor:
    """``CE(cls, labels) + τ²·KL(softmax(teacher/τ) ‖ softmax(dist/τ))``; ``logits: [B, K]`` or ``(cls, dist)``.

    A DeiT in distilled training returns ``(cls, dist)`` (CE on the class head, KL on the distillation head, as in
    the OFQ recipe); in eval it returns their average, which is what a ``(cls, dist)`` teacher is reduced to here.
    """
    cls, dist = logits if isinstance(logits, tuple) else (logits, logits)
    if isinstance(teacher_logits, tuple):
        teacher_logits = (teacher_logits[0] + teacher_logits[1]) / 2
    kl = F.kl_div(
        F.log_softmax(dist / tau, -1), F.log_softmax(teacher_logits.detach() / tau, -1), reduction="batchmean",
        log_target=True,
    )  # fmt: skip
    return F.cross_entropy(cls, labels) + tau * tau * kl


@dataclass(frozen=True)
class OFQOptions:
    """Training recipe of :func:`ofq` (steps count optimizer updates; batches sampled with replacement)."""

    bits: int = 4
    method: str = "ofq"
    qkr: bool | None = None
    steps: int = 1000
    cga_steps: int = 0
    batch_size: int = 64
    lr: float = 5e-4
    cga_lr: float = 5e-5
    weight_decay: float = 0.05
    warmup_steps: int = 0
    boundary: float = CGA_BOUNDARY
    tau: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 5, 6, 7, 8):
            raise ConfigError(f"bits={self.bits} must lie in 2..8")
        if self.method not in ("ofq", "lsq"):
            raise ConfigError(f"method={self.method!r} must be 'ofq' or 'lsq'")
        if self.steps < 0 or self.cga_steps < 0:
            raise ConfigError(f"steps={self.steps} and cga_steps={self.cga_steps} must be >= 0")
        if self.method == "lsq" and self.cga_steps:
            raise ConfigError("cga_steps needs method='ofq' (CGA acts on StatsQ weights)")

    def lr_at(self, t: int) -> float:
        """Linear warmup then cosine to 0 over the main stage; cosine from ``cga_lr`` to 0 over CGA."""
        if t < self.steps:
            if t < self.warmup_steps:
                return self.lr * (t + 1) / self.warmup_steps
            span = max(self.steps - self.warmup_steps, 1)
            return 0.5 * self.lr * (1 + math.cos(math.pi * (t - self.warmup_steps) / span))
        return 0.5 * self.cga_lr * (1 + math.cos(math.pi * (t - self.steps) / max(self.cga_steps, 1)))


def _options_diff(saved: Any, want: dict[str, Any]) -> str:
    """``key saved -> wanted`` for each differing option (only keys of ours are named)."""
    saved = saved if isinstance(saved, dict) else {}
    diff = [k for k in want if saved.get(k) != want[k]]
    return "; ".join(f"{k} {_short(saved.get(k))} -> {want[k]!r}" for k in diff) or "unknown options"


def _short(v: Any) -> str:
    """A JSON value of a checkpoint, shown only when it is a plain number, bool or short name."""
    if v is None or isinstance(v, (bool, int, float)):
        return repr(v)
    if isinstance(v, str) and len(v) <= 20 and v.isprintable():
        return repr(v)
    return "<other>"


def read_ofq_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The JSON part of an OFQ checkpoint (``step``, ``options``, ``history``, ``wall_s``, ...) from the file's
    header, without reading its tensors; an old pickle checkpoint or a corrupt file is a :class:`CheckpointError`."""
    return read_checkpoint_meta(path, OFQ_CHECKPOINT_FORMAT, OFQ_CHECKPOINT_VERSION, "OFQ checkpoint")


def _restore(
    ckpt: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module, optim: Any,
    gen: torch.Generator, total: int,
) -> tuple[int, list[dict[str, float]], float]:  # fmt: skip
    """Load a checkpoint's model, optimizer and generator state; ``(step, history, wall_s)``. Anything that does
    not fit is one :class:`CheckpointError` line naming what (never the file's own bytes)."""
    what = f"OFQ checkpoint {ckpt}"
    missing = [k for k in ("step", "history", "wall_s", "model", "optimizer", "generator") if k not in state]
    if missing:
        raise CheckpointError(f"{what} lacks {', '.join(missing)}")
    step, history, wall = state["step"], state["history"], state["wall_s"]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= total:
        raise CheckpointError(f"{what}: its step is not an integer in 0..{total}")
    if not isinstance(history, list) or len(history) != step or not all(isinstance(h, dict) for h in history):
        raise CheckpointError(f"{what}: its history does not hold one entry per step")
    if not isinstance(wall, (int, float)) or isinstance(wall, bool):
        raise CheckpointError(f"{what}: its wall_s is not a number")
    model_sd, optim_sd, gen_state = (unpack(state[k], tensors) for k in ("model", "optimizer", "generator"))
    ours = model.state_dict()
    if not isinstance(model_sd, dict) or set(model_sd) != set(ours):
        got = set(model_sd) if isinstance(model_sd, dict) else set()
        lack = sorted(set(ours) - got)
        eg = f" (e.g. {lack[0]})" if lack else ""
        raise CheckpointError(
            f"{what} does not fit the model: {len(lack)} of its tensors missing{eg}, {len(got - set(ours))} unexpected"
        )
    for k, v in ours.items():
        t = model_sd[k]
        if not isinstance(t, torch.Tensor) or t.shape != v.shape or t.dtype != v.dtype:
            raise CheckpointError(f"{what} does not fit the model: {k} has another shape or dtype")
    model.load_state_dict(model_sd)
    try:
        optim.load_state_dict(optim_sd)
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{what}: its optimizer state does not fit ({type(e).__name__})") from None
    if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != torch.uint8:
        raise CheckpointError(f"{what}: its generator state is not a uint8 tensor")
    try:
        gen.set_state(gen_state)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: its generator state does not fit ({type(e).__name__})") from None
    return step, history, float(wall)


def _forward(model: nn.Module, x: torch.Tensor):
    out = model(x)
    return tuple(out) if isinstance(out, (tuple, list)) else out


def ofq(
    model: nn.Module,
    bits: int = 4,
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    *,
    steps: int = 1000,
    cga_steps: int = 0,
    method: str = "ofq",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    device: str | torch.device | None = None,
    callback: Callable[[dict[str, float]], None] | None = None,
    **options,
) -> nn.Module:
    """Quantization-aware training of a timm ViT in place; returns the QAT model (eval mode).

    Args:
        model: a float timm ``VisionTransformer``, DeiT (distilled: trained with ``distilled_training`` on, so
            CE reads ``head`` and KL ``head_dist``) or ``SwinTransformer``; swapped in place by :func:`prepare_qat`.
        bits: weight and activation bits of the body (2, 3 or 4 in the paper; patch embed and head stay 8-bit).
        train_data: ``(x [M, ...], y [M] int64)``; batches are sampled with replacement by a seeded generator
            (its state is checkpointed, so resuming replays the same batches).
        teacher: FP teacher for the KL term; a frozen copy of ``model`` before quantization when ``None``.
        steps, cga_steps: optimizer updates of the main stage and of the CGA stage.
        method: ``"ofq"`` (StatsQ + QKR, CGA if ``cga_steps``) or ``"lsq"`` (the LSQ baseline).
        preprocess: applied to each batch of ``x`` (e.g. uint8 -> normalised float).
        checkpoint_path: the file where ``{model, optimizer, generator, step, history}`` is saved, every
            ``checkpoint_every`` steps and at the end: one safetensors file (tensors) whose metadata holds the JSON
            rest (no pickle; written to a temporary file and renamed). ``resume=True`` continues from it (exactly:
            same weights as an uninterrupted run); a corrupt file, an old pickle checkpoint (refused unread) or one
            written with other options is a :class:`~vqsuite.pipelines.io.CheckpointError`.
        stop_after: stop after this global step (to simulate an interruption).
        device: where to train (model, teacher and each batch are moved there); the model's device when ``None``.
            Training runs through an ``accelerate.Accelerator`` (one process; CPU when ``device`` is the CPU), so
            ``ACCELERATE_MIXED_PRECISION`` applies; with the default (no mixed precision) the steps are exactly the
            plain-PyTorch ones.
        callback: called after every optimizer step with that step's history entry (``step``, ``loss``, ``lr``,
            ``trainable_fraction``), e.g. to drive a progress bar.
        options: other :class:`OFQOptions` fields (``lr``, ``cga_lr``, ``weight_decay``, ``batch_size``, ...).

    The result carries ``model.vqsuite_ofq``: the options, loss history, wall time and the per-layer
    :func:`oscillation_report`.
    """
    if train_data is None:
        raise UserError("ofq needs train_data=(x, y)")
    opts = OFQOptions(bits=bits, method=method, steps=steps, cga_steps=cga_steps, **options)
    x_all, y_all = train_data
    if teacher is None:
        teacher = copy.deepcopy(model)
    teacher.eval().requires_grad_(False)
    prepare_qat(model, opts.bits, opts.method, qkr=opts.qkr)
    # DeiT (timm VisionTransformerDistilled) returns (cls, dist) only in distilled training; restored at the end
    distilled = getattr(model, "distilled_training", None)
    if distilled is not None and callable(getattr(model, "set_distilled_training", None)):
        model.set_distilled_training(True)
    if device is not None:
        model.to(device)
        teacher.to(device)
    dev = next(model.parameters()).device
    from accelerate import Accelerator

    # placement stays ours (``device``); accelerate owns backward (and mixed precision when asked for)
    accelerator = Accelerator(cpu=dev.type == "cpu", device_placement=False)
    if accelerator.num_processes > 1:
        raise UserError(f"ofq trains on one process; got {accelerator.num_processes} (run it without a launcher)")
    model.train()

    def pre(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dev)
        return preprocess(t) if preprocess is not None else t

    gen = torch.Generator().manual_seed(opts.seed)
    # LSQ steps initialise from the first batch, before the optimizer sees them
    with torch.no_grad():
        idx0 = torch.randint(len(x_all), (opts.batch_size,), generator=torch.Generator().manual_seed(opts.seed + 1))
        model(pre(x_all[idx0]))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr
    )
    train_model, optim = accelerator.prepare(model, optim)  # the same module on one process
    history: list[dict[str, float]] = []
    t0, wall = 0, 0.0
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise FileNotFoundError(f"resume=True but no checkpoint at {ckpt}")
        state, tensors = read_checkpoint(ckpt, OFQ_CHECKPOINT_FORMAT, OFQ_CHECKPOINT_VERSION, "OFQ checkpoint")
        if state.get("options") != asdict(opts):
            diff = _options_diff(state.get("options"), asdict(opts))
            raise CheckpointError(f"OFQ checkpoint {ckpt} was written with other options ({diff})")
        t0, history, wall = _restore(ckpt, state, tensors, model, optim, gen, total=opts.steps + opts.cga_steps)
        logger.info("ofq: resumed from %s at step %d", ckpt, t0)

    def save(t: int) -> None:
        if ckpt is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "step": t, "history": history, "wall_s": wall + time.perf_counter() - start, "options": asdict(opts),
            "model": pack(model.state_dict(), "model", tensors),
            "optimizer": pack(optim.state_dict(), "optim", tensors),
            "generator": pack(gen.get_state(), "generator", tensors),
        }  # fmt: skip
        write_checkpoint(ckpt, tensors, state, OFQ_CHECKPOINT_FORMAT, OFQ_CHECKPOINT_VERSION)

    cga = CGA(model, opts.boundary) if opts.cga_steps else None
    total = opts.steps + opts.cga_steps
    end = total if stop_after is None else min(total, stop_after)
    start = time.perf_counter()
    for t in range(t0, end):
        idx = torch.randint(len(x_all), (opts.batch_size,), generator=gen)
        xb, yb = pre(x_all[idx]), y_all[idx].to(dev)
        for g in optim.param_groups:
            g["lr"] = opts.lr_at(t)
        with torch.no_grad():
            t_logits = _forward(teacher, xb)
        loss = kd_loss(_forward(train_model, xb), t_logits, yb, opts.tau)
        optim.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        in_cga = cga is not None and t >= opts.steps
        frac = cga.mask_gradients() if in_cga else 1.0
        optim.step()
        if in_cga:
            cga.restore()
        track_oscillations(model)
        history.append({"step": t, "loss": float(loss.detach()), "lr": opts.lr_at(t), "trainable_fraction": frac})
        if callback is not None:
            callback(history[-1])
        if opts.log_every and (t % opts.log_every == 0 or t == total - 1):
            logger.info("ofq step %d/%d loss %.4f lr %.2e%s", t, total, float(loss.detach()), opts.lr_at(t),
                        f" cga trainable {frac:.4f}" if in_cga else "")  # fmt: skip
        if checkpoint_every and (t + 1) % checkpoint_every == 0:
            save(t + 1)
    save(end)
    wall += time.perf_counter() - start
    if distilled is not None and callable(getattr(model, "set_distilled_training", None)):
        model.set_distilled_training(distilled)
    model.eval()
    model.vqsuite_ofq = {
        "options": asdict(opts),
        "history": history,
        "wall_s": wall,
        "oscillation": oscillation_report(model),
    }
    return model
