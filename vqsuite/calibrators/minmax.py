"""Min-max (absmax) observation of quantized layers' inputs, for static activation scales."""

from __future__ import annotations

import torch
from torch import nn

from vqsuite.calibrators.data import CalibData, run_calibration_data


@torch.no_grad()
def collect_input_amax(
    model: nn.Module, layers: dict[str, nn.Module], calib_data: CalibData
) -> dict[str, torch.Tensor]:
    """Absolute maximum of each listed layer's input over ``calib_data``: ``{name: 0-d float32}``.

    The layers run with activation quantization off (``act_observing``) while observed, so every layer sees
    the float activations of the model in front of it.
    """
    amax: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            smooth = getattr(_module, "smooth", None)
            if smooth is not None:
                x = x / smooth.to(x.dtype)
            cur = x.abs().amax().float().cpu()
            amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)

        return fn

    for name, layer in layers.items():
        layer.act_observing = True
        handles.append(layer.register_forward_pre_hook(hook(name)))
    try:
        run_calibration_data(model, calib_data)
    finally:
        for h in handles:
            h.remove()
        for layer in layers.values():
            layer.act_observing = False
    missing = sorted(set(layers) - set(amax))
    if missing:
        raise ValueError(f"calibration data never reached layer(s): {', '.join(missing[:5])}")
    return amax
