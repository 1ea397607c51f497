"""Two real DCGAN generators shipped as state dicts, defined here and loaded strictly.

* ``face-dcgan`` -- ``gan-face-generate==1.1.1``, ``gan_face_generate/weights.tar`` (``netG_state_dict``): the
  PyTorch-tutorial DCGAN generator, ``z [N, 100, 1, 1] -> [N, 3, 64, 64]`` faces in [-1, 1] (nz=100, ngf=64).
  Trained on DigiFace-1M, which is licensed for research use only: **evaluation only**.
* ``eye-cdcgan`` -- ``omniart-eye-generator==0.1``, ``omniart_eye_generator/generator_model_state.pth``: a
  conditional DCGAN, ``(noise [N, 100], one-hot colour [N, 8]) -> [N, 3, 128, 128]`` eyes in [-1, 1]. That
  package loads its generator when imported, so only its file is read.

Neither training set ships, so the suite measures these against their own full-precision samples (FID between FP
and quantized samples, paired PSNR/SSIM), never against real data.
"""

from __future__ import annotations

import torch
from torch import nn

from vqsuite.zoo._assets import asset_file

FACE_REQUIREMENT = "gan-face-generate==1.1.1"
FACE_FILE = ("gan_face_generate", "weights.tar")
FACE_LICENCE = "DigiFace-1M-trained: research use only, evaluation only"
EYE_REQUIREMENT = "omniart-eye-generator==0.1"
EYE_FILE = ("omniart_eye_generator", "generator_model_state.pth")
#: the eye generator's condition words, in its one-hot order
EYE_COLOURS = ("amber", "blue", "brown", "gray", "grayscale", "green", "hazel", "red")
LATENT_DIM = 100


def _up(cin: int, cout: int, first: bool = False) -> list[nn.Module]:
    conv = (
        nn.ConvTranspose2d(cin, cout, 4, 1, 0, bias=False)
        if first
        else nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)
    )
    return [conv, nn.BatchNorm2d(cout), nn.ReLU(True)]


class FaceDCGAN(nn.Module):
    """DCGAN generator ``z [N, nz, 1, 1] -> [N, 3, 64, 64]`` (tanh); keys ``main.{0,1,3,4,6,7,9,10,12}.*``."""

    def __init__(self, nz: int = LATENT_DIM, ngf: int = 64, nc: int = 3) -> None:
        super().__init__()
        self.main = nn.Sequential(
            *_up(nz, ngf * 8, first=True),
            *_up(ngf * 8, ngf * 4),
            *_up(ngf * 4, ngf * 2),
            *_up(ngf * 2, ngf),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.reshape(z.shape[0], -1, 1, 1))


class EyeCDCGAN(nn.Module):
    """Conditional DCGAN ``(noise [N, 100], onehot [N, 8]) -> [N, 3, 128, 128]`` (tanh).

    Layout of the shipped file: a dropout (identity in eval) after the first block, so keys run
    ``main.{0,1,4,5,7,8,10,11,13,14,16}.*``.
    """

    def __init__(self, nz: int = LATENT_DIM, n_labels: int = len(EYE_COLOURS), ngf: int = 64, nc: int = 3) -> None:
        super().__init__()
        self.main = nn.Sequential(
            *_up(nz + n_labels, ngf * 16, first=True),
            nn.Dropout(0.2),
            *_up(ngf * 16, ngf * 8),
            *_up(ngf * 8, ngf * 4),
            *_up(ngf * 4, ngf * 2),
            *_up(ngf * 2, ngf),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([noise.reshape(noise.shape[0], -1), labels.to(noise.dtype)], dim=1)
        return self.main(x[:, :, None, None])


def face_latents(n: int, seed: int) -> tuple[torch.Tensor]:
    """``(z [n, 100, 1, 1],)`` standard normal from a fixed seed (the face generator's inputs)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, LATENT_DIM, 1, 1, generator=g),)


def eye_latents(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise [n, 100], one-hot [n, 8])``: standard normal noise; colours cycle through all 8 words."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, LATENT_DIM, generator=g)
    labels = nn.functional.one_hot(torch.arange(n) % len(EYE_COLOURS), len(EYE_COLOURS)).float()
    return noise, labels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] ``[N, 3, H, W]`` -> uint8 ``[N, 3, H, W]``."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_face_dcgan() -> nn.Module:
    """The face DCGAN generator (strict load of ``netG_state_dict``); eval mode, CPU. Evaluation only."""
    path = asset_file(*FACE_FILE, FACE_REQUIREMENT, "the face DCGAN weights")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = FaceDCGAN()
    model.load_state_dict(ckpt["netG_state_dict"], strict=True)
    return model.eval()


def load_eye_cdcgan() -> nn.Module:
    """The eye cDCGAN generator (strict load of the shipped state dict); eval mode, CPU."""
    path = asset_file(*EYE_FILE, EYE_REQUIREMENT, "the eye cDCGAN weights")
    model = EyeCDCGAN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
