"""Feeding user calibration data to a model, whatever shape it comes in."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from vqsuite.errors import UserError

CalibData = torch.Tensor | Iterable[Any] | Callable[[nn.Module], Any]


@torch.no_grad()
def run_calibration_data(model: nn.Module, calib_data: CalibData) -> int:
    """Run ``model`` over ``calib_data``; returns the number of forward calls.

    ``calib_data`` is one input tensor, an iterable of batches (a tensor -> ``model(t)``, a tuple or list ->
    ``model(*batch)``, a dict -> ``model(**batch)``), or a callable ``fn(model)`` that runs the model itself
    (a diffusion pipeline's sampling loop, say).
    """
    if callable(calib_data) and not isinstance(calib_data, (torch.Tensor, nn.Module)):
        calib_data(model)
        return 1
    if isinstance(calib_data, torch.Tensor):
        model(calib_data)
        return 1
    if isinstance(calib_data, dict):
        model(**calib_data)
        return 1
    n = 0
    try:
        iterator = iter(calib_data)
    except TypeError:
        raise UserError(
            f"calib_data of type {type(calib_data).__name__} is not a tensor, an iterable of batches or a callable"
        ) from None
    for batch in iterator:
        if isinstance(batch, torch.Tensor):
            model(batch)
        elif isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        else:
            raise UserError(f"calibration batch of type {type(batch).__name__} is not a tensor, tuple or dict")
        n += 1
    if n == 0:
        raise UserError("calib_data is empty")
    return n
