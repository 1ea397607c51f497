"""CLIP score wiring through torchmetrics with a tiny randomly initialised CLIP saved to a temp folder.

The numbers here are plumbing checks against a hand computation with the same random model: not CLIP scores.
"""

from __future__ import annotations

import pytest
import torch
from evals_helpers import save_tiny_clip

from vqsuite.evals.clip import CLIPFeatureAdapter, clip_score, clip_scorer, load_clip

pytest.importorskip("transformers")
#: torchmetrics' score vs the hand computation from the same features (float32 math)
SCORE_ATOL = 1e-3


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return str(save_tiny_clip(tmp_path_factory.mktemp("tiny-clip")))


def _images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_adapter_returns_tensors(clip_dir: str) -> None:
    model, processor = load_clip(clip_dir)
    assert isinstance(model, CLIPFeatureAdapter)
    px = processor(images=list(_images(2)), return_tensors="pt")["pixel_values"]
    tok = processor(text=["a cat", "the dog"], return_tensors="pt", padding=True)
    img = model.get_image_features(px)
    txt = model.get_text_features(tok["input_ids"], tok["attention_mask"])
    assert isinstance(img, torch.Tensor) and img.shape == (2, 16)
    assert isinstance(txt, torch.Tensor) and txt.shape == (2, 16)


def test_unadapted_model_breaks_torchmetrics_under_transformers5(clip_dir: str) -> None:
    """Why the adapter exists: a plain CLIPModel's feature methods return output objects in transformers 5."""
    from transformers import CLIPModel

    model, processor = load_clip(clip_dir)
    px = processor(images=list(_images(1)), return_tensors="pt")["pixel_values"]
    raw = CLIPModel.get_image_features(model.model, pixel_values=px)
    if isinstance(raw, torch.Tensor):
        pytest.skip("this transformers returns tensors from get_image_features (4.x behaviour)")
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: (model.model, processor))
    with pytest.raises(AttributeError, match="norm"):
        metric.update(list(_images(1)), ["a cat"])


def test_clip_score_equals_hand_computation(clip_dir: str) -> None:
    images, prompts = _images(3), ["a cat", "the red dog", "a photo"]
    got = clip_score(images, prompts, clip_dir, batch_size=2, progress=False)
    model, processor = load_clip(clip_dir)
    with torch.no_grad():
        px = processor(images=list(images), return_tensors="pt")["pixel_values"]
        tok = processor(text=prompts, return_tensors="pt", padding=True)
        i = torch.nn.functional.normalize(model.get_image_features(px), dim=-1)
        t = torch.nn.functional.normalize(model.get_text_features(tok["input_ids"], tok["attention_mask"]), dim=-1)
    want = max(float((100 * (i * t).sum(-1)).mean()), 0.0)  # torchmetrics: clamp of the mean
    assert got == pytest.approx(want, abs=SCORE_ATOL)
    metric = clip_scorer(load_clip(clip_dir))  # a (model, processor) pair works too
    metric.update(list(images), prompts)
    assert float(metric.compute()) == pytest.approx(want, abs=SCORE_ATOL)


def test_clip_errors(tmp_path, clip_dir: str) -> None:
    with pytest.raises(FileNotFoundError, match="not a CLIP model folder"):
        load_clip(tmp_path)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        clip_score(_images(3), ["a", "b"], clip_dir, progress=False)
