"""``fmnist-vit``: a timm ``VisionTransformer`` trained here on Fashion-MNIST (``scripts/train_fmnist_vit.py``).

28x28 grey input, patch 4 (7x7 = 49 tokens + class token), 10 classes; weights ship in the package as fp16
safetensors (``vqsuite/zoo/weights/fmnist-vit/``) and load as float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).parent / "weights" / "fmnist-vit"
#: Fashion-MNIST train-set mean/std of uint8/255 pixels
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530


def build_fmnist_vit(embed_dim: int = 192, depth: int = 6, num_heads: int = 3) -> nn.Module:
    """A randomly initialised timm ViT for ``[N, 1, 28, 28]`` inputs -> ``[N, 10]`` logits."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=4.0, global_pool="token",
    )  # fmt: skip


def vit_preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 1, 28, 28]`` (or float in [0, 1]) -> normalised float32 ``[N, 1, 28, 28]``."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return (x - FMNIST_MEAN) / FMNIST_STD


def train_record() -> dict:
    """The training run's record (config, steps, wall time, final loss, test top-1)."""
    return json.loads((WEIGHTS_DIR / "train.json").read_text())


def load_fmnist_vit() -> nn.Module:
    """The shipped trained ViT (float32, eval, CPU)."""
    from safetensors.torch import load_file

    rec = train_record()
    model = build_fmnist_vit(**rec["config"])
    sd = {k: v.float() for k, v in load_file(WEIGHTS_DIR / "model.safetensors").items()}
    model.load_state_dict(sd, strict=True)
    return model.eval()
