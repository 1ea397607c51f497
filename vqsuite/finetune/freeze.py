"""Freeze a QAT model (OFQ / LSQ, :mod:`vqsuite.finetune.ofq`) into the library's packed quantized layers.

:func:`freeze_qat` replaces every QAT module by frozen modules that hold the learned grid exactly:

- **Weights** become frozen :class:`~vqsuite.nn.QLinear` / :class:`~vqsuite.nn.QConv2d` layers (packed codes +
  per-row scales, the float master weight is gone):

  * LSQ (``round(clamp(W/s, -2^(b-1), 2^(b-1)-1))·s``, one learned ``s`` per output row): the ``int{b}`` format
    with ``wscales = s``. Its code range is LSQ's exactly (``int4`` is ``[-8, 7]``; the symmetric RTN quantizer just
    never produces ``-8``, the format stores it); b = 5 and 7 have no format of their own and use ``int6``/``int8``
    (their 8-bit container is the one a 5- or 7-bit code takes anyway).
  * StatsQ (mid-rise levels ``s·(k + ½)/n``, ``n = 2^(b-1)``, ``k ∈ [-n, n-1]``): the ``int{b}_midrise`` format
    (:mod:`vqsuite.formats.midrise`: code ``k`` means ``(k + ½)·scale``) with ``wscales = s/n``; b-bit codes in the
    b-bit container (two per byte for b <= 4), bit-identical values (``n`` is a power of two).
  * QKR's ``W_qk: [H, C, C]`` (StatsQ per row of each head) is the ``[H·C, C]`` weight of a bias-free QLinear
    ``qk``; ``v`` keeps its own QLinear.

- **Activation quantizers** (LSQ, :class:`~vqsuite.finetune.lsq.LSQActQuantizer`) stay what they are, frozen into
  :class:`LSQActQuant` (steps and biases as buffers): the library's static activation mode is one symmetric
  per-tensor scale, while OFQ's input quantizers have one learned step *per channel* plus learned pre/post biases
  (and the softmax / ``fc2`` ones are unsigned ``[0, 2^b - 1]``), none of which a ``QuantSpec`` can express. A QAT
  linear becomes :class:`ActQuantLinear` (``act_quant`` then a weight-only QLinear ``linear``), the patch conv
  :class:`ActQuantConv2d`; their QLinear/QConv2d specs say ``A:16`` because the activation grid lives beside them.
- **Attention** (:class:`~vqsuite.finetune.ofq.QATAttention`, Swin's window variant): :class:`FrozenQATAttention`
  with QLinear weights and the matmul quantizers (``k_q``/``q_q`` on the q·k operands, ``attn_q`` on the softmax
  output) kept as :class:`LSQActQuant` modules: the library has no quantized-matmul layer. It runs the QAT
  module's own ``attend`` code, so its math is the same op for op.

The frozen model's outputs equal the QAT model's eval outputs bit for bit on the reference kernels (no-grad QAT
forwards compute ``round(clamp(x/s))·s`` plainly, :func:`~vqsuite.finetune.lsq.lsq_quantize`); with ``kernel="auto"``
a CPU int kernel may take an integer-weight layer at small batch and round its input to bf16 (the mid-rise formats
always run the reference). The model gets ``vqsuite_config`` (``method="qat"``, the module structure in
``method_options``), so ``vqsuite.save_quantized`` writes a normal checkpoint folder and ``vqsuite.load_quantized(dir,
model=float_model)`` rebuilds it: :func:`restore_qat` puts the wrappers back on the float model first.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vqsuite.config import QuantConfig, QuantSpec
from vqsuite.errors import ConfigError, UserError
from vqsuite.finetune.lsq import LSQActQuantizer, LSQWeightQuantizer, qrange
from vqsuite.finetune.ofq import (
    QATAttention,
    QATConv2d,
    QATLinear,
    QATWindowAttention,
    StatsQ,
    statsq_codes,
    statsq_scale,
)
from vqsuite.formats import QTensor, get_format
from vqsuite.formats.midrise import midrise_format_name
from vqsuite.nn import QConv2d, QLinear, QuantLayer

logger = logging.getLogger(__name__)

__all__ = [
    "ActQuantConv2d",
    "ActQuantLinear",
    "FrozenQATAttention",
    "FrozenQATWindowAttention",
    "LSQActQuant",
    "QAT_METHOD",
    "freeze_qat",
    "is_qat_model",
    "lsq_weight_format",
    "restore_qat",
]

#: the ``QuantConfig.method`` a frozen QAT model records
QAT_METHOD = "qat"
#: version of the structure description in ``method_options`` (``modules``)
QAT_STRUCTURE_VERSION = 1
#: LSQ weight bits -> the integer format holding its codes (5 and 7 bits: the next format, same 8-bit container)
LSQ_WEIGHT_FORMATS: dict[int, str] = {2: "int2", 3: "int3", 4: "int4", 5: "int6", 6: "int6", 7: "int8", 8: "int8"}


def lsq_weight_format(bits: int) -> str:
    """The integer format whose code range holds LSQ's ``[-2^(b-1), 2^(b-1)-1]``."""
    try:
        return LSQ_WEIGHT_FORMATS[int(bits)]
    except KeyError:
        raise ConfigError(f"LSQ weight bits={bits} has no integer format (2..8)") from None


# ---------------------------------------------------------------------------------------------------- modules
class LSQActQuant(nn.Module):
    """A learned LSQ activation quantizer, frozen: ``x̂ = s · round(clamp((x + b_pre) / s, Q_n, Q_p)) + b_post``.

    On the last dim of ``x: [..., C]``; ``step``/``bias_pre``/``bias_post`` are ``[C]`` (per channel) or ``[]``
    (per tensor) float buffers. The same ops as :class:`~vqsuite.finetune.lsq.LSQActQuantizer`'s no-grad forward.
    """

    def __init__(self, bits: int, signed: bool, channels: int | None, biases: bool) -> None:
        super().__init__()
        self.bits, self.signed, self.channels, self.biases = int(bits), bool(signed), channels or None, bool(biases)
        self.qn, self.qp = qrange(self.bits, self.signed)
        shape = (self.channels,) if self.channels else ()
        self.register_buffer("step", torch.ones(shape))
        self.register_buffer("bias_pre", torch.zeros(shape) if self.biases else None)
        self.register_buffer("bias_post", torch.zeros(shape) if self.biases else None)

    @classmethod
    def from_qat(cls, q: LSQActQuantizer) -> LSQActQuant:
        if not bool(q.initialized):
            raise UserError(f"{q!r} was never run: its step is not learned (train or run the QAT model first)")
        out = cls(q.bits, q.signed, q.channels, q.bias_pre is not None)
        out.step = q.step.detach().clone()
        if out.biases:
            out.bias_pre, out.bias_post = q.bias_pre.detach().clone(), q.bias_post.detach().clone()
        return out.to(q.step.device)

    def describe(self) -> list:
        """``[bits, signed, channels (0 = per tensor), biases]``: what :func:`restore_qat` rebuilds it from."""
        return [self.bits, self.signed, self.channels or 0, self.biases]

    @classmethod
    def from_description(cls, d: Any, where: str) -> LSQActQuant:
        ok = isinstance(d, list) and len(d) == 4
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in (d[0], d[2])) and 2 <= d[0] <= 8
        ok = ok and isinstance(d[1], bool) and isinstance(d[3], bool) and d[2] >= 0
        if not ok:
            raise ValueError(f"qat structure: {where} is not an activation quantizer [bits, signed, channels, biases]")
        return cls(d[0], d[1], d[2], d[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., C]`` -> fake-quantized ``[..., C]``."""
        if self.bias_pre is not None:
            x = x + self.bias_pre
        xq = torch.round(torch.clamp(x / self.step, self.qn, self.qp)) * self.step
        if self.bias_post is not None:
            xq = xq + self.bias_post
        return xq

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, channels={self.channels}, biases={self.biases}"


class ActQuantLinear(nn.Module):
    """A frozen :class:`~vqsuite.finetune.ofq.QATLinear`: ``linear(act_quant(x))``, ``linear`` a weight-only QLinear
    (an ``nn.Linear`` placeholder while a checkpoint is loaded), ``act_quant`` an :class:`LSQActQuant` or ``None``."""

    def __init__(self, linear: nn.Module, act_quant: LSQActQuant | None) -> None:
        super().__init__()
        self.act_quant = act_quant
        self.linear = linear

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's signature
        """input: ``[..., in]`` -> ``[..., out]``."""
        return self.linear(input if self.act_quant is None else self.act_quant(input))


class ActQuantConv2d(nn.Module):
    """A frozen :class:`~vqsuite.finetune.ofq.QATConv2d`: ``conv(act_quant(x))`` with the input quantized per channel
    (``x: [B, C, H, W]``, channels moved last and back, as the QAT module does)."""

    def __init__(self, conv: nn.Module, act_quant: LSQActQuant) -> None:
        super().__init__()
        self.act_quant = act_quant
        self.conv = conv

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Conv2d's signature
        """input: ``[B, C, H, W]``."""
        return self.conv(self.act_quant(input.movedim(1, -1)).movedim(-1, 1))


class FrozenQATAttention(nn.Module):
    """A frozen :class:`~vqsuite.finetune.ofq.QATAttention`, running the QAT module's own ``attend``.

    Children: ``in_q``, ``k_q``, ``attn_q`` (and ``q_q`` without QKR) :class:`LSQActQuant`; with QKR ``qk``
    (QLinear ``[H·C, C]``, no bias: ``W_qk`` rows per head) and ``v`` (QLinear ``[H·d, C]``), without it ``qkv``
    (:class:`ActQuantLinear`); ``proj`` (:class:`ActQuantLinear`). Shapes as in QATAttention: ``x: [B, N, C]``.
    """

    attend = QATAttention.attend
    bias_logits = QATAttention.bias_logits
    forward = QATAttention.forward

    def __init__(self, num_heads: int, head_dim: int, scale: float, qkr: bool, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.qkr = int(num_heads), int(head_dim), float(scale), bool(qkr)
        names = ("in_q", "qk", "k_q", "v", "attn_q", "proj") if qkr else ("in_q", "qkv", "q_q", "k_q", "attn_q", "proj")
        for n in names:
            setattr(self, n, modules[n])

    #: the activation quantizers of each form (what :func:`restore_qat` rebuilds from their descriptions)
    QUANTIZERS = {True: ("in_q", "k_q", "attn_q"), False: ("in_q", "q_q", "k_q", "attn_q")}

    def logits_and_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-softmax logits ``[B, H, N, N]`` and values ``[B, H, N, d]`` of the input-quantized ``x: [B, N, C]``
        (the ops of :meth:`QATAttention.logits_and_values`, with the stored weights)."""
        b, n, c = x.shape
        h = self.num_heads
        if self.qkr:
            kk = self.k_q(self.qk(x).reshape(b, n, h, c).transpose(1, 2))
            logits = torch.einsum("bnc,bhmc->bhnm", x, kk) * self.scale
            v = self.v(x)
            return logits, v.reshape(b, n, h, self.head_dim).transpose(1, 2)
        qkv = self.qkv(x).reshape(b, n, 3, h, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_q(qkv[0]), self.k_q(qkv[1])
        return (q @ k.transpose(-2, -1)) * self.scale, qkv[2]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, qkr={self.qkr}"


class FrozenQATWindowAttention(FrozenQATAttention):
    """A frozen :class:`~vqsuite.finetune.ofq.QATWindowAttention` (Swin W-MSA / SW-MSA): the relative-position bias
    table stays float; ``relative_position_index`` comes from the float module."""

    rel_pos_bias = QATWindowAttention.rel_pos_bias
    bias_logits = QATWindowAttention.bias_logits
    forward = QATWindowAttention.forward

    def __init__(self, num_heads: int, head_dim: int, scale: float, qkr: bool, modules: dict[str, nn.Module],
                 window_area: int, table: torch.Tensor, index: torch.Tensor) -> None:  # fmt: skip
        super().__init__(num_heads, head_dim, scale, qkr, modules)
        self.window_area = int(window_area)
        self.relative_position_bias_table = nn.Parameter(table.detach().clone(), requires_grad=False)
        self.register_buffer("relative_position_index", index.clone(), persistent=False)


# ---------------------------------------------------------------------------------------------------- weights
def weight_qtensor(w_nk: torch.Tensor, quantizer: nn.Module, name: str) -> QTensor:
    """The learned grid of a QAT weight as a :class:`QTensor` (codes ``[N, K]``, per-row scales ``[N, 1]``).

    w_nk: the master weight in its GEMM view ``[N, K]`` (rows = the quantizer's rows); ``quantizer`` a
    :class:`~vqsuite.finetune.ofq.StatsQ` or an LSQ weight quantizer.
    """
    w = w_nk.detach()
    n = w.shape[0]
    if isinstance(quantizer, StatsQ):
        levels = 2 ** (quantizer.bits - 1)
        codes = statsq_codes(w, quantizer.bits)
        scales = (statsq_scale(w) / levels).reshape(n, 1)
        fmt = midrise_format_name(quantizer.bits)
    elif isinstance(quantizer, LSQWeightQuantizer):
        if not bool(quantizer.initialized):
            raise UserError(f"{name}: its LSQ step was never initialised (train or run the QAT model first)")
        step = quantizer.step.detach()
        if step.numel() != n:
            raise UserError(f"{name}: {step.numel()} LSQ steps for {n} rows")
        step = step.reshape(n, 1)
        codes = torch.round(torch.clamp(w / step, quantizer.qn, quantizer.qp))
        scales = step
        fmt = lsq_weight_format(quantizer.bits)
    else:
        raise UserError(f"{name}: weight quantizer {type(quantizer).__name__} has no frozen form")
    f = get_format(fmt)
    if codes.numel() and (float(codes.min()) < f.qmin or float(codes.max()) > f.qmax):
        raise AssertionError(f"{name}: codes leave {fmt}'s range")  # an internal invariant (ranges match by design)
    return QTensor(codes=codes.to(torch.int8), scales=scales.float().contiguous(), fmt=fmt, group_size=None)


def _frozen_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, quantizer: nn.Module, kernel: str, name: str
) -> QLinear:
    """A frozen QLinear holding ``weight: [N, K]``'s learned grid (and ``bias``)."""
    qt = weight_qtensor(weight, quantizer, name)
    n, k = weight.shape
    q = QLinear(k, n, bias is not None, QuantSpec(weight=qt.fmt, kernel=kernel), device=weight.device,
                dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        q.__dict__["_parameters"]["weight"].copy_(weight)
        if bias is not None:
            q.bias.copy_(bias)
    q.layer_name = name
    return q.freeze(qt)


def _frozen_qat_linear(m: QATLinear, kernel: str, name: str) -> ActQuantLinear:
    act = None if m.aq is None else LSQActQuant.from_qat(m.aq)
    q = _frozen_linear(m.weight, m.bias, m.wq, kernel, f"{name}.linear")
    return ActQuantLinear(q, act).train(m.training)


def _frozen_qat_conv(m: QATConv2d, kernel: str, name: str) -> ActQuantConv2d:
    w = m.weight.detach()
    kw = m.conv_kw
    qt = weight_qtensor(w.reshape(w.shape[0], -1), m.wq, f"{name}.conv")
    q = QConv2d(w.shape[1] * kw["groups"], w.shape[0], tuple(w.shape[2:]), kw["stride"], kw["padding"], kw["dilation"],
                kw["groups"], m.bias is not None, spec=QuantSpec(weight=qt.fmt, kernel=kernel), device=w.device,
                dtype=w.dtype)  # fmt: skip
    with torch.no_grad():
        q.__dict__["_parameters"]["weight"].copy_(w)
        if m.bias is not None:
            q.bias.copy_(m.bias)
    q.layer_name = f"{name}.conv"
    return ActQuantConv2d(q.freeze(qt), LSQActQuant.from_qat(m.aq)).train(m.training)


def _frozen_attention(m: QATAttention, kernel: str, name: str) -> FrozenQATAttention:
    mods: dict[str, nn.Module] = {"in_q": LSQActQuant.from_qat(m.in_q), "k_q": LSQActQuant.from_qat(m.k_q)}
    mods["attn_q"] = LSQActQuant.from_qat(m.attn_q)
    mods["proj"] = _frozen_qat_linear(m.proj, kernel, f"{name}.proj")
    if m.qkr:
        h, c, _ = m.w_qk.shape
        mods["qk"] = _frozen_linear(m.w_qk.reshape(h * c, c), None, m.qk_wq, kernel, f"{name}.qk")
        mods["v"] = _frozen_linear(m.v_weight, m.v_bias, m.v_wq, kernel, f"{name}.v")
    else:
        mods["qkv"] = _frozen_qat_linear(m.qkv, kernel, f"{name}.qkv")
        mods["q_q"] = LSQActQuant.from_qat(m.q_q)
    args = (m.num_heads, m.head_dim, m.scale, m.qkr, mods)
    if isinstance(m, QATWindowAttention):
        out = FrozenQATWindowAttention(*args, m.window_area, m.relative_position_bias_table,
                                       m.relative_position_index)  # fmt: skip
    else:
        out = FrozenQATAttention(*args)
    return out.train(m.training)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


#: QAT module classes that must all be gone after :func:`freeze_qat`
_QAT_TYPES = (QATLinear, QATConv2d, QATAttention, LSQActQuantizer, LSQWeightQuantizer, StatsQ)


def is_qat_model(model: nn.Module) -> bool:
    """Whether ``model`` still holds QAT modules (:func:`~vqsuite.finetune.ofq.prepare_qat`'s) to freeze."""
    return any(isinstance(m, _QAT_TYPES) for m in model.modules())


@torch.no_grad()
def freeze_qat(model: nn.Module, *, kernel: str = "auto") -> nn.Module:
    """Turn a QAT model (after :func:`~vqsuite.finetune.ofq` / :func:`~vqsuite.finetune.ofq.prepare_qat` and at
    least one forward) into a frozen quantized model, in place; returns it. See the module docstring for what each
    QAT module becomes.

    ``kernel``: the frozen layers' kernel preference (``"auto"``, ``"reference"``: bit-identical to the QAT
    forward on every input; ``"triton"``). The model gets ``vqsuite_config`` (method ``"qat"``, the structure in
    its options) and ``vqsuite_qat_frozen`` (bytes before/after, layer counts).
    """
    from vqsuite.pipelines.report import module_nbytes

    qat = getattr(model, "vqsuite_qat", None)
    if not isinstance(qat, dict) or not is_qat_model(model):
        raise UserError("freeze_qat needs a QAT model (vqsuite.finetune.ofq / prepare_qat); this one has no QAT layers")
    QuantSpec(kernel=kernel)  # validates the name
    bytes_before = module_nbytes(model)
    structure: list[list] = []
    counts = {"linear": 0, "conv2d": 0, "attention": 0}
    for name, m in list(model.named_modules()):
        if isinstance(m, QATAttention):
            frozen = _frozen_attention(m, kernel, name)
            kind = "window_attention" if isinstance(m, QATWindowAttention) else "attention"
            quant = {q: getattr(frozen, q).describe() for q in FrozenQATAttention.QUANTIZERS[frozen.qkr]}
            quant["proj"] = _act_description(frozen.proj)
            if not frozen.qkr:
                quant["qkv"] = _act_description(frozen.qkv)
            structure.append([name, kind, {"qkr": frozen.qkr, "quantizers": quant}])
            _set(model, name, frozen)
            counts["attention"] += 1
    for name, m in list(model.named_modules()):
        if isinstance(m, QATLinear):
            frozen = _frozen_qat_linear(m, kernel, name)
            structure.append([name, "linear", {"act": _act_description(frozen)}])
            counts["linear"] += 1
        elif isinstance(m, QATConv2d):
            frozen = _frozen_qat_conv(m, kernel, name)
            structure.append([name, "conv2d", {"act": frozen.act_quant.describe()}])
            counts["conv2d"] += 1
        else:
            continue
        _set(model, name, frozen)
    left = [n for n, m in model.named_modules() if isinstance(m, _QAT_TYPES)]
    if left:
        raise UserError(f"freeze_qat: {left[0]} ({type(model.get_submodule(left[0])).__name__}) has no frozen form")
    formats = sorted({m.spec.weight for m in model.modules() if isinstance(m, QuantLayer)})
    body = next((f for f in formats if f.endswith("_midrise")), None) or lsq_weight_format(qat["bits"])
    options = {
        "structure_version": QAT_STRUCTURE_VERSION,
        "qat_method": qat.get("method"),
        "bits": qat.get("bits"),
        "qkr": qat.get("qkr"),
        "modules": structure,
    }
    model.vqsuite_config = QuantConfig(
        default=QuantSpec(weight=body, kernel=kernel), name=f"qat-{qat.get('method')}-w{qat.get('bits')}",
        method=QAT_METHOD, method_options=options,
    )  # fmt: skip
    bytes_after = module_nbytes(model)
    model.vqsuite_qat_frozen = {
        "bytes_before": bytes_before, "bytes_after": bytes_after, "formats": formats, **counts,
    }  # fmt: skip
    logger.info(
        "freeze_qat: %d attention, %d linear, %d conv layers frozen (%s); %d -> %d bytes", counts["attention"],
        counts["linear"], counts["conv2d"], ", ".join(formats), bytes_before, bytes_after,
    )  # fmt: skip
    return model


def _act_description(m: ActQuantLinear) -> list | None:
    return None if m.act_quant is None else m.act_quant.describe()


# ---------------------------------------------------------------------------------------------------- loading
def _act(d: Any, where: str) -> LSQActQuant | None:
    return None if d is None else LSQActQuant.from_description(d, where)


def _placeholder(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """A float Linear on the meta device, replaced by the checkpoint's QLinear before any tensor is loaded."""
    return nn.Linear(in_features, out_features, bias=bias, device="meta")


def _skeleton_attention(attn: nn.Module, kind: str, info: dict, where: str) -> FrozenQATAttention:
    """The frozen attention's structure on a float timm attention (weights come from the checkpoint)."""
    qkr, quant = info.get("qkr"), info.get("quantizers")
    if not isinstance(qkr, bool) or not isinstance(quant, dict):
        raise ValueError(f"qat structure: {where} lacks qkr/quantizers")
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or not hasattr(attn, "num_heads"):
        raise ValueError(f"qat structure: {where} is a {type(attn).__name__} in the model, not a fused-qkv attention")
    from vqsuite.finetune.ofq import _head_dim

    h, d, c = int(attn.num_heads), _head_dim(attn), qkv.in_features
    scale = float(getattr(attn, "scale", d**-0.5))
    mods: dict[str, nn.Module] = {q: _act(quant.get(q), f"{where}.{q}") for q in FrozenQATAttention.QUANTIZERS[qkr]}
    mods["proj"] = ActQuantLinear(proj, _act(quant.get("proj"), f"{where}.proj"))
    if qkr:
        mods["qk"] = _placeholder(c, h * c, False)
        mods["v"] = _placeholder(c, h * d, qkv.bias is not None)
    else:
        mods["qkv"] = ActQuantLinear(qkv, _act(quant.get("qkv"), f"{where}.qkv"))
    if kind == "window_attention":
        table, index = (
            getattr(attn, "relative_position_bias_table", None),
            getattr(attn, "relative_position_index", None),
        )
        if not isinstance(table, torch.Tensor) or not isinstance(index, torch.Tensor):
            raise ValueError(f"qat structure: {where} has no relative-position bias (not a Swin WindowAttention)")
        out = FrozenQATWindowAttention(h, d, scale, qkr, mods, int(attn.window_area), table, index)
    else:
        out = FrozenQATAttention(h, d, scale, qkr, mods)
    return out.train(attn.training)


def restore_qat(model: nn.Module, options: dict) -> Any:
    """Rebuild a frozen QAT model's structure on its float architecture, for loading (``method="qat"`` checkpoints,
    called by :func:`vqsuite.load_quantized`).

    Wraps each recorded Linear/Conv2d in :class:`ActQuantLinear`/:class:`ActQuantConv2d` and replaces each recorded
    attention by a :class:`FrozenQATAttention` skeleton (meta placeholders where QKR adds weights); the loader then
    swaps in the QLinear/QConv2d layers and loads every tensor. Modules already in frozen form are left alone.
    Returns an undo function; ``ValueError`` (one line) when the description does not fit the model.
    """
    if not isinstance(options, dict) or options.get("structure_version") != QAT_STRUCTURE_VERSION:
        raise ValueError(f"qat structure version {options.get('structure_version')!r} is not supported "
                         f"(this vqsuite reads {QAT_STRUCTURE_VERSION})")  # fmt: skip
    entries = options.get("modules")
    if not isinstance(entries, list) or not entries:
        raise ValueError("qat structure: no modules recorded")
    plan: list[tuple[str, nn.Module, nn.Module]] = []
    for i, entry in enumerate(entries):
        if not (
            isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[2], dict)
        ):
            raise ValueError(f"qat structure: modules[{i}] is not [name, kind, info]")
        name, kind, info = entry
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"qat structure: module {name[:120]!r} does not exist in the model") from None
        if isinstance(current, (ActQuantLinear, ActQuantConv2d, FrozenQATAttention)):
            continue
        if kind == "linear":
            if not isinstance(current, nn.Linear):
                raise ValueError(f"qat structure: {name} is a {type(current).__name__} in the model, not a Linear")
            new: nn.Module = ActQuantLinear(current, _act(info.get("act"), name))
        elif kind == "conv2d":
            if not isinstance(current, nn.Conv2d):
                raise ValueError(f"qat structure: {name} is a {type(current).__name__} in the model, not a Conv2d")
            act = _act(info.get("act"), name)
            if act is None:
                raise ValueError(f"qat structure: {name} lacks its activation quantizer")
            new = ActQuantConv2d(current, act)
        elif kind in ("attention", "window_attention"):
            new = _skeleton_attention(current, kind, info, name)
        else:
            raise ValueError(f"qat structure: {name} has unknown kind {str(kind)[:40]!r}")
        plan.append((name, current, new))
    for name, _, new in plan:
        _set(model, name, new)
    logger.info("qat: restored the frozen structure of %d module(s)", len(plan))

    def undo() -> None:
        for name, old, _ in reversed(plan):
            _set(model, name, old)

    return undo
