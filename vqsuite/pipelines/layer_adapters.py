"""Layer adapters: how a layer class with its own ``forward`` is expressed as a plain float layer the rules quantize.

A subclass of ``nn.Linear``/``nn.Conv2d`` that overrides ``forward`` may compute something else than its base
(timm's ``StdConv2d`` standardises its weight at every call, ``Conv2dSame`` pads the input dynamically), so
``quantize_model`` does not swap it blindly. An adapter, keyed by the class's qualified name (module + qualname,
so nothing here imports timm or diffusers), says what the layer computes in terms of a layer vqsuite knows:

* ``effective(module)`` returns a float layer with the same output: ``module`` itself when the math is the base
  class's (``timm.layers.Linear`` only casts for TorchScript), or a new layer holding the *effective weight*
  (weight standardisation depends on the weight alone, so it is computed once, here, and that weight is quantized).
* ``base`` is the float type whose :data:`~vqsuite.pipelines.modules.LAYER_RULES` entry decides whether a spec fits;
  ``build`` optionally replaces that entry's builder (``QConv2dSame.from_float`` for dynamic "SAME" padding).
* ``reason(module)`` says why this instance cannot be adapted (a LoRA branch attached), or ``None``.

The effective weight is fixed when the layer is quantized: with ``freeze=False`` (fine-tuning the fake-quant model),
the master weight trained is the standardised one, and standardisation is not re-applied after each step.

The lookup walks the class's MRO but accepts an adapted ancestor only when the class still uses that ancestor's
``forward``: a further subclass with its own ``forward`` gets no adapter by inheritance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqsuite.config import QuantSpec
from vqsuite.errors import UserError
from vqsuite.nn import QConv2dSame, QuantLayer, SamePadConv2d

__all__ = ["LAYER_ADAPTERS", "LayerAdapter", "adapter_for", "class_key", "effective_layer", "register_layer_adapter"]


@dataclass(frozen=True)
class LayerAdapter:
    """How one float layer class is quantized as a plain layer.

    Attributes:
        class_name: the adapted class, ``f"{cls.__module__}.{cls.__qualname__}"`` (``timm.layers.std_conv.StdConv2d``).
        base: the plain float type the effective layer is (``nn.Conv2d``); its layer rule checks the spec.
        effective: ``fn(module) -> float layer`` with the same output as ``module`` (``module`` itself allowed).
        note: what the adapter does, for the report (``"weight standardised once"``).
        build: ``fn(effective layer, spec) -> quantized layer`` instead of the base rule's builder, or ``None``.
        reason: ``fn(module) -> why this instance cannot be adapted, or None``; ``None`` = always adaptable.
        extra_args: parameters of the adapted class's ``forward`` after the input that do not change the effective
            layer's math (``MotionLinear``'s ``channel_dim``, which only its excluded activation reads); the quantized
            layer accepts and drops them (:func:`accept_extra_args`), so callers keep calling it as before.
    """

    class_name: str
    base: type[nn.Module]
    effective: Callable[[Any], nn.Module]
    note: str
    build: Callable[[Any, QuantSpec], QuantLayer] | None = None
    reason: Callable[[Any], str | None] | None = None
    extra_args: tuple[str, ...] = ()


#: qualified class name -> adapter
LAYER_ADAPTERS: dict[str, LayerAdapter] = {}


def class_key(cls: type) -> str:
    """``"module.QualName"``: the registry key of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer_adapter(adapter: LayerAdapter, *, overwrite: bool = False) -> None:
    """Teach ``quantize_model`` (and ``load_quantized``) a layer class that overrides ``forward``."""
    if not isinstance(adapter.base, type) or not issubclass(adapter.base, nn.Module):
        raise UserError(f"base={adapter.base!r} of the adapter for {adapter.class_name!r} must be an nn.Module type")
    if adapter.class_name in LAYER_ADAPTERS and not overwrite:
        raise UserError(f"a layer adapter for {adapter.class_name!r} is already registered (pass overwrite=True)")
    LAYER_ADAPTERS[adapter.class_name] = adapter


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for ``module``'s class, or for the nearest ancestor whose ``forward`` it still uses."""
    cls = type(module)
    for anc in cls.__mro__:
        adapter = LAYER_ADAPTERS.get(class_key(anc))
        if adapter is not None:
            return adapter if getattr(cls, "forward", None) is getattr(anc, "forward", None) else None
    return None


def accept_extra_args(qlayer: nn.Module, adapter: LayerAdapter | None) -> nn.Module:
    """Let ``qlayer`` (which replaces a layer of ``adapter``'s class) be called with that class's extra forward
    arguments (``adapter.extra_args``, positional after the input or by keyword): a forward pre-hook drops them.
    Applied by ``quantize_model`` and ``load_quantized``; returns ``qlayer``."""
    if adapter is None or not adapter.extra_args:
        return qlayer
    names = frozenset(adapter.extra_args)

    def drop_extra(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args[:1], {k: v for k, v in kwargs.items() if k not in names}

    qlayer.register_forward_pre_hook(drop_extra, with_kwargs=True)
    return qlayer


def effective_layer(module: nn.Module) -> nn.Module:
    """The plain float layer ``module`` is quantized as (``module`` itself when it has no adapter)."""
    adapter = adapter_for(module)
    return module if adapter is None else adapter.effective(module)


# ------------------------------------------------------------------------------------------ building blocks
def _same_math(module: nn.Module) -> nn.Module:
    return module


def _conv_like(module: nn.Conv2d, weight: torch.Tensor, *, same_pad: bool) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` (or :class:`SamePadConv2d`) with ``module``'s geometry, bias and ``weight``."""
    cls = SamePadConv2d if same_pad else nn.Conv2d
    conv = cls(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        stride=module.stride,
        padding=0 if same_pad else module.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=module.bias is not None,
        padding_mode="zeros" if same_pad else module.padding_mode,
        device="meta",
        dtype=weight.dtype,
    )
    conv.weight = nn.Parameter(weight.detach().clone(), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        conv.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    conv.train(module.training)
    return conv


def _standardised(weight: torch.Tensor, eps: float, gain: torch.Tensor | None = None) -> torch.Tensor:
    """Weight standardisation ``[O, I/g, kh, kw]``: each output filter to zero mean and unit (biased) variance,
    times ``gain [O]``. The same ``batch_norm`` call the layers make, so the result is bit-identical to theirs."""
    out = weight.shape[0]
    return F.batch_norm(
        weight.reshape(1, out, -1), None, None, weight=gain, training=True, momentum=0.0, eps=eps
    ).reshape_as(weight)


@torch.no_grad()
def _std_conv(module: nn.Conv2d) -> nn.Conv2d:
    """timm ``StdConv2d`` / ``StdConv2dSame``: weight standardised (eps), optional dynamic "SAME" padding."""
    w = _standardised(module.weight, module.eps)
    return _conv_like(module, w, same_pad=bool(getattr(module, "same_pad", False)))


@torch.no_grad()
def _scaled_std_conv(module: nn.Conv2d) -> nn.Conv2d:
    """timm ``ScaledStdConv2d`` / ``ScaledStdConv2dSame``: standardised weight times ``gain * scale``
    (``scale = gamma / sqrt(fan_in)``), optional dynamic "SAME" padding."""
    w = _standardised(module.weight, module.eps, (module.gain * module.scale).view(-1))
    return _conv_like(module, w, same_pad=bool(getattr(module, "same_pad", False)))


@torch.no_grad()
def _same_pad_conv(module: nn.Conv2d) -> nn.Conv2d:
    """timm ``Conv2dSame`` / ``Conv2dSameExport``: the layer's own weight, dynamic "SAME" padding, padding 0."""
    return _conv_like(module, module.weight, same_pad=True)


def _conv_build(float_conv: nn.Conv2d, spec: QuantSpec) -> QuantLayer:
    """Dynamic-padding effective layers get :class:`QConv2dSame`; static ones the ordinary ``QConv2d``."""
    from vqsuite.nn import QConv2d

    return (QConv2dSame if isinstance(float_conv, SamePadConv2d) else QConv2d).from_float(float_conv, spec)


@torch.no_grad()
def _scaled_linear(module: nn.Module) -> nn.Linear:
    """diffusers ``MotionLinear`` (Wan-Animate): ``linear(x, weight * scale, bias)``."""
    out_f, in_f = module.weight.shape
    lin = nn.Linear(in_f, out_f, bias=module.bias is not None, device="meta", dtype=module.weight.dtype)
    lin.weight = nn.Parameter((module.weight * module.scale).detach().clone())
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach().clone())
    lin.train(module.training)
    return lin


def _no_lora(module: nn.Module) -> str | None:
    if getattr(module, "lora_layer", None) is not None:
        return f"{type(module).__name__} has a LoRA branch attached; fuse it (fuse_lora) first"
    return None


def _motion_linear_reason(module: nn.Module) -> str | None:
    if getattr(module, "use_activation", False):
        return f"{type(module).__name__} fuses a leaky-ReLU activation into its output"
    return None


def _register_builtin() -> None:
    std = "timm.layers.std_conv."
    same = "timm.layers.conv2d_same."
    for name, fn, note in (
        (std + "StdConv2d", _std_conv, "weight standardised once"),
        (std + "StdConv2dSame", _std_conv, "weight standardised once; TF-SAME padding"),
        (std + "ScaledStdConv2d", _scaled_std_conv, "scaled weight standardisation applied once"),
        (std + "ScaledStdConv2dSame", _scaled_std_conv, "scaled weight standardisation applied once; TF-SAME padding"),
        (same + "Conv2dSame", _same_pad_conv, "TF-SAME padding"),
        (same + "Conv2dSameExport", _same_pad_conv, "TF-SAME padding"),
    ):
        register_layer_adapter(LayerAdapter(name, nn.Conv2d, fn, note, build=_conv_build))
    register_layer_adapter(LayerAdapter("timm.layers.linear.Linear", nn.Linear, _same_math, "same math as Linear"))
    register_layer_adapter(
        LayerAdapter(
            "diffusers.models.lora.LoRACompatibleLinear", nn.Linear, _same_math, "no LoRA: Linear", None, _no_lora
        )
    )
    register_layer_adapter(
        LayerAdapter(
            "diffusers.models.lora.LoRACompatibleConv", nn.Conv2d, _same_math, "no LoRA: Conv2d", None, _no_lora
        )
    )
    register_layer_adapter(
        LayerAdapter(
            "diffusers.models.transformers.transformer_wan_animate.MotionLinear",
            nn.Linear,
            _scaled_linear,
            "weight * scale folded once",
            None,
            _motion_linear_reason,
            extra_args=("channel_dim",),
        )
    )


_register_builtin()
