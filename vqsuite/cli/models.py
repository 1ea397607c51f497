"""Building float models for the CLI from a short name and a local weights file (never from a hub)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vqsuite.cli.errors import CLIError  # the CLI's one user error (imported from here by older callers)

__all__ = ["CLIError", "build_model", "load_state_dict_file"]

logger = logging.getLogger(__name__)


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
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CLIError(f"cannot read weights {path}: {type(e).__name__}: {first}") from None
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
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]  # torch: a title, then the mismatches
            detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
            raise CLIError(f"{weights} does not fit {name}: {detail[:200]}") from None
    else:
        logger.warning("%s has random weights (no --weights given)", name)
    return model.eval()
