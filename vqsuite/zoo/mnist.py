"""Two real MNIST classifiers shipped as state dicts in registry packages, defined here and loaded strictly.

* ``mnist-cnn3`` -- ``digit-recognizer-py==0.1.0`` (MIT), ``digit_recognizer/models/handwriting_model.pth``:
  three 3x3 conv + ReLU + 2x2 max-pool stages (32, 64, 128 channels) and a 1152-256-10 MLP. 99.06 % on the
  official MNIST test set.
* ``mnist-cnn2`` -- ``ccexam==1.0.0`` (MIT), ``ccexam/weights/mnist.pth`` (its ``MNISTNet``): two conv stages
  (32, 64 channels) and a 3136-128-10 MLP. 99.05 % on the MNIST test set.

Both take ``[N, 1, 28, 28]`` float32 images normalised as ``(x - 0.1307) / 0.3081`` with ``x`` in [0, 1] and
return ``[N, 10]`` logits. The architectures were read from the packages' model files; nothing is imported from them.
"""

from __future__ import annotations

import torch
from torch import nn

from vqsuite.zoo._assets import asset_file

#: MNIST normalisation both checkpoints were trained with
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

CNN3_REQUIREMENT = "digit-recognizer-py==0.1.0"
CNN3_FILE = ("digit_recognizer", "models/handwriting_model.pth")
CNN2_REQUIREMENT = "ccexam==1.0.0"
CNN2_FILE = ("ccexam", "weights/mnist.pth")


def _conv_stage(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]


class DigitCNN3(nn.Module):
    """3 conv stages + 2 FC (state-dict keys ``conv_layers.*``, ``fc_layers.*``). ``[N,1,28,28] -> [N,10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(*_conv_stage(1, 32), *_conv_stage(32, 64), *_conv_stage(64, 128))
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(self.conv_layers(x).flatten(1))


class DigitCNN2(nn.Module):
    """2 conv stages + 2 FC (state-dict keys ``features.*``, ``classifier.*``). ``[N,1,28,28] -> [N,10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*_conv_stage(1, 32), *_conv_stage(32, 64))
        self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def mnist_preprocess(x: torch.Tensor) -> torch.Tensor:
    """``[N, 1, 28, 28]`` uint8 (0..255) or float in [0, 1] -> the normalised float32 input of both CNNs."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return (x - MNIST_MEAN) / MNIST_STD


def _load(model: nn.Module, module: str, relpath: str, requirement: str, what: str) -> nn.Module:
    sd = torch.load(asset_file(module, relpath, requirement, what), map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_cnn3() -> nn.Module:
    """The digit-recognizer-py CNN (3 conv + 2 FC) with its shipped weights, eval mode, CPU."""
    return _load(DigitCNN3(), *CNN3_FILE, CNN3_REQUIREMENT, "the 3-conv MNIST CNN weights")


def load_cnn2() -> nn.Module:
    """The ccexam MNISTNet (2 conv + 2 FC) with its shipped weights, eval mode, CPU."""
    return _load(DigitCNN2(), *CNN2_FILE, CNN2_REQUIREMENT, "the 2-conv MNIST CNN weights")
