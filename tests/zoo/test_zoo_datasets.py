"""vqsuite.zoo.datasets: shapes, dtypes, labels and the missing-package messages of the shipped real data."""

from __future__ import annotations

import gzip
import hashlib

import pytest
import torch

from vqsuite.zoo import AssetMissingError, datasets

#: first ten labels of the official MNIST t10k set
T10K_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
#: per-class counts of the official t10k labels
T10K_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

needs_fashion = pytest.mark.skipif(
    not (datasets.FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed ({datasets.FASHION_INSTALL})",
)


def test_mnist_test_is_the_official_t10k() -> None:
    x, y = datasets.mnist_test()
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y[:10].tolist() == T10K_FIRST_LABELS
    assert torch.bincount(y).tolist() == T10K_CLASS_COUNTS
    assert int(x.max()) == 255 and int(x.min()) == 0


@needs_fashion
@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_fashion_mnist(split: str, n: int) -> None:
    x, y = datasets.fashion_mnist(split)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [n // 10] * 10  # Fashion-MNIST is exactly balanced
    assert len(datasets.FASHION_CLASSES) == 10


def test_fashion_mnist_missing(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setattr(datasets, "FASHION_DIR", tmp_path)
    with pytest.raises(AssetMissingError, match=r"^Fashion-MNIST .*: apt-get install -y dataset-fashion-mnist$"):
        datasets.fashion_mnist("test")
    with pytest.raises(ValueError, match="split='val'"):
        datasets.fashion_mnist("val")


def test_idx_reader_roundtrip(tmp_path) -> None:  # noqa: ANN001
    data = bytes(range(24))
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + data)
    arr = datasets._read_idx(path)
    assert arr.shape == (2, 3, 4) and arr.tobytes() == data


def test_imagenet20() -> None:
    images, labels = datasets.imagenet20()
    assert len(images) == 20 and labels.shape == (20,)
    assert labels[:3].tolist() == [243, 559, 438]  # from the file names imagenet_00_243.jpg, ...
    assert all(img.mode == "RGB" and min(img.size) >= 224 for img in images)


def test_agreement_photos_cover_every_installed_source() -> None:
    photos = datasets.agreement_photos()
    names = [n for n, _ in photos]
    assert len(set(names)) == len(names)
    sources = {n.split(":")[0] for n in names}
    assert {"foolbox", "skimage", "sklearn"} <= sources
    assert ("opencv" in sources) == datasets.OPENCV_DOC_DIR.is_dir()
    assert "skimage:astronaut" in names and "sklearn:china" in names
    assert all(img.mode == "RGB" and min(img.size) >= datasets.MIN_PHOTO_SIDE for _, img in photos)
    # a fixed order: the same set hashes the same twice
    h = [hashlib.sha1(n.encode()).hexdigest() for n in names]
    assert h == [hashlib.sha1(n.encode()).hexdigest() for n, _ in datasets.agreement_photos()]


def test_mnist_unpickler_refuses_other_globals() -> None:
    import io
    import pickle

    payload = pickle.dumps(print)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
        datasets._NumpyOnlyUnpickler(io.BytesIO(payload)).load()


def test_mnist_train_is_disjoint_from_test() -> None:
    xtr, ytr = datasets.mnist_train()
    assert xtr.shape == (50000, 1, 28, 28) and ytr[:5].tolist() == [5, 0, 4, 1, 9]  # the official train order
    xte, _ = datasets.mnist_test()
    train_rows = {bytes(r) for r in xtr.reshape(len(xtr), -1).numpy()}
    assert not any(bytes(r) in train_rows for r in xte[:500].reshape(500, -1).numpy())


def test_foolbox_small_photos_are_the_cifar_images() -> None:
    photos = datasets.foolbox_small_photos()
    assert len(photos) == 40 and all(p.size == (32, 32) and p.mode == "RGB" for p in photos)
