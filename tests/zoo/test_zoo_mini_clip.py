"""``mini-clip``: the shipped CLIPModel trained here loads offline with its sha256 checked, its tokenizer makes every
caption word one token, and it classifies real test images zero-shot (prompt ensemble) well above chance."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from vqsuite import zoo
from vqsuite.errors import UserError
from vqsuite.zoo import mini_clip

pytestmark = pytest.mark.skipif(
    "mini-clip" not in zoo.list(), reason="mini-clip weights (vqsuite/zoo/weights/mini-clip) not present"
)
#: zero-shot top-1 on the first N_ZERO_SHOT test images must reach these (chance 10 %). Measured: MNIST 96.0 %,
#: Fashion-MNIST 81.5 % on these 200; 96.37 % / 80.11 % on the full 10k sets (train.json, BENCHMARKS.md)
N_ZERO_SHOT = 200
MNIST_ZERO_SHOT_BAR = 0.90
FASHION_ZERO_SHOT_BAR = 0.70


@pytest.fixture(scope="module")
def clip() -> tuple:
    return mini_clip.load_mini_clip()


def test_zoo_entry_gives_model_and_processor() -> None:
    from transformers import CLIPModel, CLIPProcessor

    m = zoo.load("mini-clip")
    assert isinstance(m.model, CLIPModel) and isinstance(m.preprocess, CLIPProcessor)
    assert m.kind == "features" and not m.model.training
    assert m.meta["train"]["sha256"] == mini_clip.weights_sha256()
    assert all(p.dtype == torch.float32 for p in m.model.parameters())


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mini-clip"
    shutil.copytree(mini_clip.WEIGHTS_DIR, folder)
    blob = bytearray((folder / "model.safetensors").read_bytes())
    blob[-1] ^= 0x01  # one bit of the last weight
    (folder / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(UserError, match="sha256"):
        mini_clip.load_mini_clip(folder)


def test_every_caption_word_is_one_token(clip: tuple) -> None:
    _, processor = clip
    tok = processor.tokenizer
    for w in mini_clip.caption_words():
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, tok.convert_ids_to_tokens(ids))
    longest = max((c for ds in ("mnist", "fashion-mnist") for cs in mini_clip.class_captions(ds) for c in cs), key=len)
    assert len(tok(longest).input_ids) <= mini_clip.MAX_TOKENS


def test_processor_matches_the_training_transform(clip: tuple) -> None:
    """The processor (PIL bicubic to 32, mean = std = 0.5) and :func:`pixel_values` agree on both framings."""
    from vqsuite.zoo.datasets import mnist_test

    _, processor = clip
    x = mnist_test()[0][:16]
    for imgs in (x, torch.nn.functional.pad(x, (2, 2, 2, 2))):
        got = processor(images=list(imgs.expand(-1, 3, -1, -1)), return_tensors="pt")["pixel_values"]
        assert got.shape == (16, 3, 32, 32)
        # at most one uint8 step of rounding difference (2 / 255 after the 0.5 normalisation)
        assert (got - mini_clip.pixel_values(imgs)).abs().max() <= 2 / 255 + 1e-6


@pytest.mark.parametrize(("dataset", "bar"), [("mnist", MNIST_ZERO_SHOT_BAR), ("fashion-mnist", FASHION_ZERO_SHOT_BAR)])
def test_zero_shot_accuracy_on_real_test_images(clip: tuple, dataset: str, bar: float) -> None:
    from vqsuite.zoo.datasets import fashion_mnist, mnist_test

    x, y = mnist_test() if dataset == "mnist" else fashion_mnist("test")
    model, processor = clip
    pred = mini_clip.zero_shot_predict(model, processor, x[:N_ZERO_SHOT], dataset)
    acc = (pred == y[:N_ZERO_SHOT]).float().mean().item()
    assert acc >= bar, f"{dataset} zero-shot {acc:.3f} < {bar}"


def test_every_shipped_file_is_package_data() -> None:
    """A non-editable install ships the folder: each file matches a ``[tool.setuptools.package-data]`` pattern."""
    import fnmatch
    import tomllib

    root = Path(mini_clip.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vqsuite"]
    pkg = root / "vqsuite"
    files = [p.relative_to(pkg).as_posix() for p in mini_clip.WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert "zoo/weights/mini-clip/model.safetensors" in files
    for f in files:
        assert any(fnmatch.fnmatchcase(f, pat) and f.count("/") == pat.count("/") for pat in patterns), f
