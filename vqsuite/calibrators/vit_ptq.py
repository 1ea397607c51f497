"""Post-training activation quantizers for vision transformers (METHODS.md §7): PTQ4ViT and RepQ-ViT.

- Twin-uniform post-softmax quantizer (PTQ4ViT), range-select form: ``x̂ = Q(x; Δ1)`` if ``x < s`` else
  ``Q(x; Δ2)`` with ``Δ1 = s/(2^{k-1}-1)``, ``Δ2 = 1/(2^{k-1}-1)``, ``s ∈ {2^-i, i = 0…19}`` (the reference code
  sums the two clamped terms; we do not).
- Twin-uniform post-GELU quantizer (PTQ4ViT): negatives on a fixed ``Δ_neg = 0.16997/2^{k-1}``, ``q ∈ [-2^{k-1}, 0]``;
  positives on a searched ``Δ_pos``, ``q ∈ [0, 2^{k-1}-1]``; ``x̂`` is the sum of the two terms.
- log√2 post-softmax quantizer (RepQ-ViT): ``q = round(-2·log2(x/Δ))``, ``q ≥ 2^k`` maps to 0, else
  ``x̂ = Δ·2^{-⌈q/2⌉}·(√2 if q is odd else 1)``; ``Δ`` chosen by MSE among the 0.999/0.9999/0.99999 quantiles.
- Post-LayerNorm reparameterization (RepQ-ViT): per-channel asymmetric ranges folded into the LayerNorm and the
  next Linear so that one per-tensor asymmetric quantizer fits every channel.

Used by ``quantize_model(model, "vit-w4a4-ptq", calib_data=...)`` (``method="vit-ptq"``): before the layer swap
:func:`prepare_vit_ptq` reparameterizes the LayerNorms on the float model and wraps timm's ``Attention``, the
LayerNorms and the MLP activation with activation quantizers; after the swap :func:`calibrate_vit_ptq` observes
``calib_data`` once and fixes every quantizer. Parameter searches minimise the quantizer's own MSE on the
calibration sample (not PTQ4ViT's Hessian-guided output metric).

Save/load: the quantizers' parameters are buffers and their state (``off``/``observe``/``quant``) is module extra
state, so they travel in the checkpoint's state dict; the RepQ folding lives in the saved LayerNorm and Linear
tensors. ``load_quantized`` calls :func:`restore_vit_ptq` on the float model first, which puts the same wrappers
back (no calibration, no folding) from the saved config's ``method_options``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vqsuite.calibrators.data import CalibData, run_calibration_data
from vqsuite.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

#: PTQ4ViT's fixed negative range of GELU outputs (min of GELU is about -0.16997)
GELU_NEG_RANGE = 0.16997
#: candidate split points of the twin-uniform softmax quantizer: 2^-i
SOFTMAX_SPLITS = tuple(2.0**-i for i in range(20))
#: RepQ-ViT's candidate quantiles for the log√2 quantizer's Δ
LOG2_QUANTILES = (0.999, 0.9999, 0.99999)
#: PTQ4ViT's Δ search grid: (α + i(β-α)/100)·Δ_init
SEARCH_ALPHA, SEARCH_BETA, SEARCH_POINTS = 0.01, 1.2, 100
#: values each quantizer keeps from calibration (random subsample per batch)
SAMPLE_LIMIT = 1 << 18
#: an activation quantizer's states, in the order its saved extra state indexes them
QUANTIZER_MODES = ("off", "observe", "quant")


# ---------------------------------------------------------------------------------------------------- pure ops
def uniform_asym(x: torch.Tensor, bits: int, delta: float | torch.Tensor, zero: float | torch.Tensor) -> torch.Tensor:
    """Asymmetric uniform: ``(clamp(round(x/Δ) + z, 0, 2^k - 1) - z)·Δ``."""
    return (torch.clamp(torch.round(x / delta) + zero, 0, 2**bits - 1) - zero) * delta


def uniform_asym_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Δ, z)`` covering ``[lo, hi]`` (widened to contain 0); elementwise for per-channel ranges."""
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    delta = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    return delta, torch.round(-lo / delta)


def twin_uniform_softmax(x: torch.Tensor, bits: int, split: float) -> torch.Tensor:
    """PTQ4ViT post-softmax quantizer, range-select form; ``x`` in [0, 1]."""
    m = 2 ** (bits - 1) - 1
    d1, d2 = split / m, 1.0 / m
    q1 = torch.clamp(torch.round(x / d1), 0, m) * d1
    q2 = torch.clamp(torch.round(x / d2), 0, m) * d2
    return torch.where(x < split, q1, q2)


def twin_uniform_gelu(x: torch.Tensor, bits: int, delta_pos: float) -> torch.Tensor:
    """PTQ4ViT post-GELU quantizer: fixed-step negatives plus searched-step positives."""
    n = 2 ** (bits - 1)
    d_neg = GELU_NEG_RANGE / n
    neg = torch.clamp(torch.round(x.clamp(max=0) / d_neg), -n, 0) * d_neg
    pos = torch.clamp(torch.round(x.clamp(min=0) / delta_pos), 0, n - 1) * delta_pos
    return neg + pos


def log_sqrt2_quantize(x: torch.Tensor, bits: int, delta: float) -> torch.Tensor:
    """RepQ-ViT log√2 quantizer for ``x >= 0`` (post-softmax)."""
    with torch.no_grad():
        q = torch.round(-2 * torch.log2(x.clamp(min=0) / delta))  # x = 0 -> +inf
        zero = q >= 2**bits
        q = q.clamp(0, 2**bits - 1)
        odd = torch.remainder(q, 2) == 1
        out = delta * torch.pow(2.0, -torch.ceil(q / 2)) * torch.where(odd, math.sqrt(2.0), 1.0)
    return torch.where(zero, torch.zeros_like(out), out).to(x.dtype)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


# ---------------------------------------------------------------------------------------------------- modules
class ActQuantizer(nn.Module):
    """An activation quantizer with three states: ``observe`` (collect a sample), ``quant`` and ``off``.

    Subclasses implement ``fit(sample)`` (set the parameters from a 1-D float sample) and ``quantize(x)``.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = int(bits)
        self.mode = "off"
        self._sample: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            flat = x.detach().float().reshape(-1)
            if flat.numel() > SAMPLE_LIMIT // 4:
                g = torch.Generator(device=flat.device).manual_seed(len(self._sample))
                flat = flat[torch.randint(flat.numel(), (SAMPLE_LIMIT // 4,), generator=g, device=flat.device)]
            self._sample.append(flat.cpu())
            return x
        if self.mode == "quant":
            return self.quantize(x)
        return x

    @torch.no_grad()
    def finish(self) -> None:
        """Fit the parameters on the observed sample and switch to ``quant``."""
        if not self._sample:
            raise UserError(f"{type(self).__name__}: calibration data never reached this quantizer")
        sample = torch.cat(self._sample)
        if sample.numel() > SAMPLE_LIMIT:
            sample = sample[torch.randperm(sample.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLE_LIMIT]]
        self.fit(sample)
        self._sample = []
        self.mode = "quant"

    def get_extra_state(self) -> torch.Tensor:
        """The state as a 0-d uint8 tensor (index into :data:`QUANTIZER_MODES`), so a safetensors checkpoint keeps
        it; the observed sample is not state (it only lives between ``observe`` and :meth:`finish`)."""
        return torch.tensor(QUANTIZER_MODES.index(self.mode), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        i = int(state)
        if not 0 <= i < len(QUANTIZER_MODES):
            raise UserError(f"{type(self).__name__}: saved mode index {i} is not one of {QUANTIZER_MODES}")
        self.mode, self._sample = QUANTIZER_MODES[i], []

    def fit(self, sample: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class UniformQuantizer(ActQuantizer):
    """Per-tensor asymmetric min-max uniform quantizer."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.register_buffer("delta", torch.ones(()))
        self.register_buffer("zero", torch.zeros(()))

    def fit(self, sample: torch.Tensor) -> None:
        d, z = uniform_asym_params(sample.min(), sample.max(), self.bits)
        self.delta.copy_(d)
        self.zero.copy_(z)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_asym(x, self.bits, self.delta, self.zero).to(x.dtype)


class TwinUniformSoftmaxQuantizer(ActQuantizer):
    """PTQ4ViT twin-uniform post-softmax quantizer; the split ``s`` is searched by MSE over ``2^-i``."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.register_buffer("split", torch.ones(()))

    def fit(self, sample: torch.Tensor) -> None:
        best = min(SOFTMAX_SPLITS, key=lambda s: _mse(twin_uniform_softmax(sample, self.bits, s), sample))
        self.split.fill_(best)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return twin_uniform_softmax(x, self.bits, float(self.split))


class TwinUniformGeluQuantizer(ActQuantizer):
    """PTQ4ViT twin-uniform post-GELU quantizer; ``Δ_pos`` searched by MSE on PTQ4ViT's grid."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.register_buffer("delta_pos", torch.ones(()))

    def fit(self, sample: torch.Tensor) -> None:
        init = max(float(sample.max()), 1e-8) / (2 ** (self.bits - 1) - 1)
        grid = [
            (SEARCH_ALPHA + i * (SEARCH_BETA - SEARCH_ALPHA) / SEARCH_POINTS) * init for i in range(SEARCH_POINTS + 1)
        ]
        self.delta_pos.fill_(min(grid, key=lambda d: _mse(twin_uniform_gelu(sample, self.bits, d), sample)))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return twin_uniform_gelu(x, self.bits, float(self.delta_pos))


class LogSqrt2Quantizer(ActQuantizer):
    """RepQ-ViT log√2 post-softmax quantizer; ``Δ`` chosen by MSE among :data:`LOG2_QUANTILES`."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.register_buffer("delta", torch.ones(()))

    def fit(self, sample: torch.Tensor) -> None:
        cands = [float(torch.quantile(sample, q)) for q in LOG2_QUANTILES]
        cands = [c for c in cands if c > 0] or [float(sample.max().clamp(min=1e-8))]
        self.delta.fill_(min(cands, key=lambda d: _mse(log_sqrt2_quantize(sample, self.bits, d), sample)))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return log_sqrt2_quantize(x, self.bits, float(self.delta))


SOFTMAX_QUANTIZERS: dict[str, type[ActQuantizer]] = {
    "log2": LogSqrt2Quantizer,
    "twin": TwinUniformSoftmaxQuantizer,
    "uniform": UniformQuantizer,
}
GELU_QUANTIZERS: dict[str, type[ActQuantizer]] = {"twin": TwinUniformGeluQuantizer, "uniform": UniformQuantizer}


class QuantAfter(nn.Module):
    """``quant(inner(x))``: an activation quantizer on a module's output (a LayerNorm, the MLP activation)."""

    def __init__(self, inner: nn.Module, quant: ActQuantizer) -> None:
        super().__init__()
        self.inner, self.quant = inner, quant

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the wrapped module's parameter name
        return self.quant(self.inner(input))


class PTQAttention(nn.Module):
    """timm ``Attention`` with quantized q, k, softmax output and ``proj`` input; ``qkv``/``proj`` kept by name.

    Shapes: ``x: [B, N, C]`` -> ``[B, N, C]``; the softmax quantizer sees ``[B, H, N, N]``.
    """

    def __init__(self, attn: nn.Module, bits: int, softmax: str = "log2") -> None:
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.q_quant, self.k_quant = UniformQuantizer(bits), UniformQuantizer(bits)
        self.v_quant = UniformQuantizer(bits)
        self.softmax_quant = SOFTMAX_QUANTIZERS[softmax](bits)
        self.proj_quant = UniformQuantizer(bits)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        if attn_mask is not None:
            raise NotImplementedError("PTQAttention does not take an attention mask")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = self.q_quant(qkv[0]), self.k_quant(qkv[1]), self.v_quant(qkv[2])
        attn = self.softmax_quant(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.proj_quant(out))


# ---------------------------------------------------------------------------------------------------- RepQ LN
@torch.no_grad()
def reparameterize_layernorm(
    norm: nn.LayerNorm, linears: list[nn.Linear], lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> dict[str, torch.Tensor]:
    """RepQ-ViT: fold per-channel asymmetric ranges ``[lo_c, hi_c]`` of ``norm``'s output into it and ``linears``.

    ``Δ_c, z_c`` from the ranges; ``Δ̃ = mean Δ_c``, ``z̃ = mean z_c``, ``r = Δ_c/Δ̃``, ``b = min_c/r - miñ``
    (``min = -zΔ``). LayerNorm: ``γ ← γ/r``, ``β ← β/r - b``; each next Linear: ``W ← W·diag(r)``,
    ``bias += W·b``. The float function is unchanged; returns ``{"r", "b", "delta", "zero"}``.
    """
    delta_c, zero_c = uniform_asym_params(lo.float(), hi.float(), bits)
    delta_t, zero_t = delta_c.mean(), zero_c.mean()
    r = delta_c / delta_t
    b = (-zero_c * delta_c) / r - (-zero_t * delta_t)
    dt = norm.weight.dtype
    norm.weight.copy_((norm.weight.float() / r).to(dt))
    if norm.bias is None:
        raise UserError("RepQ LayerNorm reparameterization needs a LayerNorm bias")
    norm.bias.copy_((norm.bias.float() / r - b).to(dt))
    for lin in linears:
        w = lin.weight.float() * r
        lin.weight.copy_(w.to(lin.weight.dtype))
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
        lin.bias.copy_((lin.bias.float() + w @ b).to(lin.bias.dtype))
    return {"r": r, "b": b, "delta": delta_t, "zero": zero_t}


# ---------------------------------------------------------------------------------------------------- wiring
@dataclass(frozen=True)
class ViTPTQOptions:
    """``method_options`` of ``method="vit-ptq"`` configs."""

    act_bits: int = 4
    softmax: str = "log2"
    gelu: str = "twin"
    ln_reparam: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.act_bits <= 8:
            raise ConfigError(f"act_bits={self.act_bits} must lie in 2..8")
        if self.softmax not in SOFTMAX_QUANTIZERS:
            raise ConfigError(f"softmax={self.softmax!r} must be one of {', '.join(SOFTMAX_QUANTIZERS)}")
        if self.gelu not in GELU_QUANTIZERS:
            raise ConfigError(f"gelu={self.gelu!r} must be one of {', '.join(GELU_QUANTIZERS)}")

    @classmethod
    def from_dict(cls, d: dict) -> ViTPTQOptions:
        unknown = set(d) - {"act_bits", "softmax", "gelu", "ln_reparam"}
        if unknown:
            raise ConfigError(f"unknown vit-ptq option(s) {sorted(unknown)}")
        return cls(**d)


def _vit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm transformer blocks: modules with ``norm1``, ``attn`` (fused qkv), ``norm2`` and ``mlp.fc1/fc2``."""
    out = []
    for name, m in model.named_modules():
        attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
        if (
            isinstance(getattr(m, "norm1", None), nn.LayerNorm)
            and isinstance(getattr(m, "norm2", None), nn.LayerNorm)
            and isinstance(getattr(attn, "qkv", None), nn.Linear)
            and isinstance(getattr(attn, "proj", None), nn.Linear)
            and isinstance(getattr(mlp, "fc1", None), nn.Linear)
            and isinstance(getattr(mlp, "fc2", None), nn.Linear)
            and not hasattr(attn, "relative_position_bias_table")
        ):
            out.append((name, m))
    return out


def _quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def _wrap_block(blk: nn.Module, opts: ViTPTQOptions) -> None:
    """Put the activation quantizers (mode ``off``) around one timm block's LayerNorms, attention and MLP act."""
    blk.norm1 = QuantAfter(blk.norm1, UniformQuantizer(opts.act_bits))
    blk.norm2 = QuantAfter(blk.norm2, UniformQuantizer(opts.act_bits))
    blk.attn = PTQAttention(blk.attn, opts.act_bits, opts.softmax)
    blk.mlp.act = QuantAfter(blk.mlp.act, GELU_QUANTIZERS[opts.gelu](opts.act_bits))


def restore_vit_ptq(model: nn.Module, options: dict) -> Callable[[], None]:
    """Rebuild the wrapper structure of a ``method="vit-ptq"`` model on its float architecture, for loading.

    Inserts the same quantizer modules :func:`prepare_vit_ptq` does, with neither calibration nor RepQ folding:
    the quantizer buffers and states and the folded LayerNorm/Linear tensors come from the checkpoint's state
    dict. Blocks already wrapped (the model was quantized with this recipe) are left alone. Returns an undo
    function that takes the wrappers out again (a failed load leaves the model as it was). ``ValueError`` when
    the model has no timm block at all.
    """
    opts = ViTPTQOptions.from_dict(options)
    blocks = _vit_blocks(model)
    wrapped = any(isinstance(m, PTQAttention) for m in model.modules())
    if not blocks and not wrapped:
        raise UserError("method='vit-ptq' checkpoint: the model has no timm ViT block (norm1/attn.qkv/norm2/mlp)")
    saved = [(blk, blk.norm1, blk.norm2, blk.attn, blk.mlp.act) for _, blk in blocks]
    for _, blk in blocks:
        _wrap_block(blk, opts)
    logger.info("vit-ptq: restored activation quantizers on %d block(s) (A%d)", len(blocks), opts.act_bits)

    def undo() -> None:
        for blk, norm1, norm2, attn, act in saved:
            blk.norm1, blk.norm2, blk.attn = norm1, norm2, attn
            blk.mlp.act = act

    return undo


@torch.no_grad()
def prepare_vit_ptq(model: nn.Module, options: dict, calib_data: CalibData | None) -> int:
    """Reparameterize LayerNorms (RepQ, on the float model) and insert activation quantizers; returns #blocks.

    Must run before the Linear swap (the folded weights are what gets quantized). Raises before touching the
    model when ``calib_data`` is missing or no timm block is found.
    """
    opts = ViTPTQOptions.from_dict(options)
    if calib_data is None:
        raise UserError("method='vit-ptq' needs calib_data (activation ranges are static)")
    blocks = _vit_blocks(model)
    if not blocks:
        raise UserError("method='vit-ptq' found no timm ViT block (norm1/attn.qkv/norm2/mlp.fc1/fc2)")
    if opts.ln_reparam:
        ranges: dict[str, list[torch.Tensor]] = {}

        def hook(key: str):
            def fn(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
                flat = out.detach().float().reshape(-1, out.shape[-1])
                lo, hi = flat.min(0).values, flat.max(0).values
                if key in ranges:
                    lo, hi = torch.minimum(lo, ranges[key][0]), torch.maximum(hi, ranges[key][1])
                ranges[key] = [lo, hi]

            return fn

        handles = []
        for name, blk in blocks:
            handles.append(blk.norm1.register_forward_hook(hook(f"{name}.norm1")))
            handles.append(blk.norm2.register_forward_hook(hook(f"{name}.norm2")))
        try:
            was_training = model.training
            model.eval()
            run_calibration_data(model, calib_data)
            model.train(was_training)
        finally:
            for h in handles:
                h.remove()
        for name, blk in blocks:
            reparameterize_layernorm(blk.norm1, [blk.attn.qkv], *ranges[f"{name}.norm1"], opts.act_bits)
            reparameterize_layernorm(blk.norm2, [blk.mlp.fc1], *ranges[f"{name}.norm2"], opts.act_bits)
    for _, blk in blocks:
        _wrap_block(blk, opts)
    logger.info("vit-ptq: %d block(s), A%d, softmax=%s, gelu=%s, ln_reparam=%s", len(blocks), opts.act_bits,
                opts.softmax, opts.gelu, opts.ln_reparam)  # fmt: skip
    return len(blocks)


@torch.no_grad()
def calibrate_vit_ptq(model: nn.Module, calib_data: CalibData) -> int:
    """Observe ``calib_data`` (weights already fake-quantized) and fix every activation quantizer; returns count.

    All quantizers observe in one pass (PTQ4ViT's parallel calibration), each seeing float activations upstream.
    """
    quants = _quantizers(model)
    for q in quants:
        q.mode = "observe"
    was_training = model.training
    model.eval()
    try:
        run_calibration_data(model, calib_data)
        for q in quants:
            q.finish()
    except BaseException:
        for q in quants:
            q.mode, q._sample = "off", []
        raise
    finally:
        model.train(was_training)
    return len(quants)
