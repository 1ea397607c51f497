"""Building float models for the CLI from a short name and a local weights file (never from a hub)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


class CLIError(Exception):
    """A user error the CLI reports as one line with exit code 2."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pt/.pth`` file, without pickle (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or pickled-object files: one readable line
        raise CLIError(f"cannot read weights {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model", "netG_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CLIError(f"{path} does not hold a state dict")
    return sd


def build_model(name: str, weights: str | None = None) -> nn.Module:
    """``timm:<model>`` or ``torchvision:<model>``, random init unless ``weights`` (a local file) is given."""
    lib, sep, arch = name.partition(":")
    if not sep or lib not in ("timm", "torchvision"):
        raise CLIError(f"model {name!r} must look like 'timm:<name>' or 'torchvision:<name>'")
    if lib == "timm":
        import timm

        if not timm.is_model(arch):
            raise CLIError(f"timm has no model named {arch!r}")
        model = timm.create_model(arch, pretrained=False)
    else:
        import torchvision

        try:
            model = torchvision.models.get_model(arch, weights=None)
        except ValueError:
            raise CLIError(f"torchvision has no model named {arch!r}") from None
    if weights:
        sd = load_state_dict_file(weights)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CLIError(f"{weights} does not fit {name}: {str(e).splitlines()[1].strip()[:200]}") from None
    else:
        logger.warning("%s has random weights (no --weights given)", name)
    return model.eval()
