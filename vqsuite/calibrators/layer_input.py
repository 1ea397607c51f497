"""The input tensor of a Linear/Conv layer call, however the caller passed it.

Calibrators observe layer inputs through forward pre-hooks. A plain pre-hook only sees positional arguments, but
diffusers calls some layers by keyword (``proj_in(input=x)`` in ``UNetMotionModel``); such a call would be
invisible to calibration. :func:`register_input_hook` sees both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

#: the name of the input parameter of ``nn.Linear.forward`` / ``nn.ConvNd.forward`` (and of the quantized layers)
INPUT_KWARG = "input"


def layer_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The layer's input: its first positional argument or the keyword ``input``; ``None`` if not a tensor."""
    x = args[0] if args else kwargs.get(INPUT_KWARG)
    return x if isinstance(x, torch.Tensor) else None


def register_input_hook(module: nn.Module, fn: Callable[[nn.Module, torch.Tensor], None]) -> RemovableHandle:
    """Call ``fn(module, x)`` before each forward of ``module`` that receives a tensor input ``x`` (positional or
    ``input=``); returns the hook's handle."""

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = layer_input(args, kwargs)
        if x is not None:
            fn(mod, x)

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)
