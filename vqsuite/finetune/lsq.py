"""LSQ (learned step size) fake-quantizers for quantization-aware training.

``x̂ = s · round(clamp(x / s, Q_n, Q_p))`` with a learnable step ``s`` whose gradient is scaled by
``g = 1 / sqrt(numel_per_step · Q_p)`` (Esser et al.); rounding passes gradients straight through.

Activation quantizers carry two learnable per-channel biases, as in the official OFQ code (``move_b4`` and
``move_aft``): ``x̂ = LSQ(x + b_pre) + b_post`` (both start at zero). Signed ranges are
``[-2^{b-1}, 2^{b-1} - 1]``, unsigned ``[0, 2^b - 1]`` (softmax probabilities, the MLP's second input).
The step is initialised on the first batch to ``2 · mean|x| / sqrt(Q_p)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vqsuite.errors import ConfigError


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """Forward ``round(x)``, backward identity."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Forward exactly ``x`` (``x + 0``), backward ``g · grad``."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(Q_n, Q_p)`` of a ``bits``-bit signed or unsigned quantizer."""
    if bits < 1 or (signed and bits < 2):
        raise ValueError(f"{bits=} is too small for a {'signed' if signed else 'unsigned'} quantizer")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """LSQ fake-quantization of ``x`` with ``step`` broadcastable to ``x``.

    Without a gradient to carry (``no_grad``, or neither input requires one) the value is computed plainly as
    ``round(clamp(x / step, qn, qp)) · step``: exactly what a frozen model stores and runs
    (:mod:`vqsuite.finetune.freeze`), with no straight-through arithmetic in it.
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or step.requires_grad)):
        return torch.round(torch.clamp(x / step, qn, qp)) * step
    s = grad_scale(step, g)
    return round_pass(torch.clamp(x / s, qn, qp)) * s


class LSQActQuantizer(nn.Module):
    """LSQ activation quantizer on the last dim of ``x: [..., C]``.

    Args:
        bits: bit width.
        channels: ``C`` for a per-channel step and per-channel biases, or ``None`` for per-tensor ones.
        signed: signed range, or unsigned ``[0, 2^b - 1]``.
        biases: learnable pre/post biases (official OFQ ``move_b4``/``move_aft``).
    """

    def __init__(self, bits: int, channels: int | None = None, *, signed: bool = True, biases: bool = True) -> None:
        super().__init__()
        self.bits, self.signed, self.channels = int(bits), bool(signed), channels
        self.qn, self.qp = qrange(self.bits, self.signed)
        shape = (channels,) if channels else ()
        self.step = nn.Parameter(torch.ones(shape))
        if biases:
            self.bias_pre = nn.Parameter(torch.zeros(shape))
            self.bias_post = nn.Parameter(torch.zeros(shape))
        else:
            self.register_parameter("bias_pre", None)
            self.register_parameter("bias_post", None)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """``step = 2 · mean|x| / sqrt(Q_p)`` (per channel over all other dims)."""
        a = x.detach().abs().float()
        m = a.reshape(-1, a.shape[-1]).mean(0) if self.channels else a.mean()
        self.step.copy_((2 * m / math.sqrt(self.qp)).clamp(min=1e-8))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., C]`` -> fake-quantized ``[..., C]``."""
        if self.bias_pre is not None:
            x = x + self.bias_pre
        if not bool(self.initialized):
            self.init_from(x)
        per_step = x.numel() // max(self.step.numel(), 1)
        xq = lsq_quantize(x, self.step, self.qn, self.qp, 1.0 / math.sqrt(per_step * self.qp))
        if self.bias_post is not None:
            xq = xq + self.bias_post
        return xq

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, channels={self.channels}"


class LSQWeightQuantizer(nn.Module):
    """LSQ weight quantizer, one learnable step per output row of ``w: [N, ...]``; signed range.

    ``codes(w)`` gives the integer levels (used by the oscillation tracker).
    """

    def __init__(self, bits: int, rows: int) -> None:
        super().__init__()
        self.bits = int(bits)
        self.qn, self.qp = qrange(self.bits, True)
        self.step = nn.Parameter(torch.ones(rows))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        m = w.detach().abs().reshape(w.shape[0], -1).float().mean(1)
        self.step.copy_((2 * m / math.sqrt(self.qp)).clamp(min=1e-8))
        self.initialized.fill_(True)

    def _step(self, w: torch.Tensor) -> torch.Tensor:
        return self.step.reshape(-1, *([1] * (w.ndim - 1)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """w: ``[N, ...]`` -> fake-quantized ``[N, ...]``."""
        if not bool(self.initialized):
            self.init_from(w)
        g = 1.0 / math.sqrt((w.numel() // w.shape[0]) * self.qp)
        return lsq_quantize(w, self._step(w), self.qn, self.qp, g)

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Integer levels of ``w`` (same shape)."""
        return torch.round(torch.clamp(w / self._step(w), self.qn, self.qp))


class TimestepLSQActQuantizer(nn.Module):
    """Per-timestep LSQ activation quantizer (EfficientDM's TALSQ, Eq. 9): one learnable step per slot.

    ``x̂ = s_t · Q(clamp(x / s_t, q_min, q_max))`` with ``s_t = step[slot]``; symmetric (no zero point): the
    static activation formats this wraps are symmetric (``fake_quantize_static``), so EfficientDM's asymmetric
    zero point is not used. ``Q`` is round-to-nearest for integer formats, the format's own rounding (FP8 cast,
    E2M1) for float ones; rounding passes gradients straight through, the step's gradient is LSQ's, scaled by
    ``g = 1 / sqrt(numel · q_max)``.

    The forward *value* is exactly :func:`vqsuite.nn.quantizers.fake_quantize_static` with ``step[slot]`` (the
    gradient path is added as ``y_grad - y_grad.detach()``, an exact zero), so a layer that stores the learned
    steps as its static scales reproduces the training forward bit for bit.

    Args:
        init_steps: ``[S]`` initial step sizes (positive, finite), one per slot.
        fmt: the static activation format name (``"int8"``, ``"int4"``, ``"fp8_e4m3"``, ...).
    """

    def __init__(self, init_steps: torch.Tensor, fmt: str) -> None:
        super().__init__()
        from vqsuite.formats import get_format

        init_steps = init_steps.detach().float().reshape(-1)
        if init_steps.numel() == 0 or not bool(torch.isfinite(init_steps).all()) or not bool((init_steps > 0).all()):
            raise ValueError(f"init_steps must be positive and finite, got {init_steps.tolist()}")
        f = get_format(fmt)
        if f.asymmetric:
            raise ConfigError(f"TimestepLSQActQuantizer is symmetric; fmt={fmt!r} is asymmetric")
        self.fmt = f.name
        self.qn, self.qp = float(f.qmin), float(f.qmax)
        self.step = nn.Parameter(init_steps.clone())

    @property
    def num_slots(self) -> int:
        return int(self.step.numel())

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        from vqsuite.nn.quantizers import fake_quantize_static

        # the format's rounding of already-clamped values at unit scale
        return fake_quantize_static(v.detach(), self.fmt, torch.ones((), device=v.device))

    def forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """x: ``[..., C]`` any float dtype -> fake-quantized, same shape and dtype; ``slot`` in ``[0, S)``."""
        from vqsuite.nn.quantizers import fake_quantize_static

        s = self.step[slot]
        value = fake_quantize_static(x.detach(), self.fmt, s.detach())
        if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
            return value
        sg = grad_scale(s.clamp(min=torch.finfo(torch.float32).tiny), 1.0 / math.sqrt(x.numel() * self.qp))
        v = torch.clamp(x.float() / sg, self.qn, self.qp)
        y = ((v + (self._round(v) - v).detach()) * sg).to(x.dtype)
        return value + (y - y.detach())

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}, slots={self.num_slots}"
