"""Min-max (absmax) observation of quantized layers' inputs, for static activation scales."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vqsuite.calibrators.data import CalibData, run_calibration_data
from vqsuite.calibrators.layer_input import register_input_hook
from vqsuite.errors import UserError


@torch.no_grad()
def collect_input_amax(
    model: nn.Module, layers: dict[str, nn.Module], calib_data: CalibData
) -> dict[str, torch.Tensor]:
    """Absolute maximum of each listed layer's input over ``calib_data``: ``{name: 0-d float32}``.

    The layers run with activation quantization off (``act_observing``) while observed, so every layer sees
    the float activations of the model in front of it.
    """
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module: nn.Module, x: torch.Tensor) -> None:
            if x.numel() == 0:  # an empty batch has no range to observe
                return
            x = smoothed_input(_module, x.detach())
            cur = x.abs().amax().float().cpu()
            amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)

        return fn

    observe_layer_inputs(model, layers, calib_data, hook)
    check_reached(layers, amax)
    return amax


def smoothed_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input the layer quantizes: ``x / λ`` for layers with a smoothing vector, ``x`` otherwise."""
    smooth = getattr(module, "smooth", None)
    return x if smooth is None else x / smooth.to(x.dtype)


def observe_layer_inputs(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calib_data: CalibData,
    hook_for: Callable[[str], Callable[[nn.Module, torch.Tensor], None]],
) -> None:
    """Run ``calib_data`` through ``model`` with each listed layer observing (activation quantization off) and an
    input hook ``hook_for(name)(module, x)`` on it (it sees positional and ``input=`` calls); hooks and observing
    flags are removed even if a batch fails."""
    handles = []
    for name, layer in layers.items():
        layer.act_observing = True
        handles.append(register_input_hook(layer, hook_for(name)))
    try:
        run_calibration_data(model, calib_data)
    finally:
        for h in handles:
            h.remove()
        for layer in layers.values():
            layer.act_observing = False


def check_reached(layers: dict[str, nn.Module], seen: dict[str, object]) -> None:
    """Raise ``ValueError`` naming the layers the calibration data never reached."""
    missing = sorted(set(layers) - set(seen))
    if missing:
        raise UserError(f"calibration data never reached layer(s): {', '.join(missing[:5])}")
