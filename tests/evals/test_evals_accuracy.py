"""Top-k accuracy (tensors and a labelled folder with timm preprocessing) and agreement with the FP model."""

from __future__ import annotations

import math

import pytest
import torch
from evals_helpers import tiny_classifier

import vqsuite
from vqsuite.evals.accuracy import (
    agreement,
    agreement_from_logits,
    collect_logits,
    evaluate_accuracy,
    labelled_folder,
    timm_transform,
    topk_accuracy,
)
from vqsuite.evals.images import save_images


def test_topk_on_known_logits() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = torch.tensor([1, 2, 2, 1])
    # top1: rows 0 and 2 right; top2: row 1 (label 2 second) and row 3 (label 1 second) too
    assert topk_accuracy(logits, labels, topk=(1, 2)) == {"top1": 0.5, "top2": 1.0, "n": 4}
    assert topk_accuracy(logits, labels, topk=(5,))["top5"] == 1.0  # k capped at the class count
    with pytest.raises(ValueError, match="4 predictions for 3 labels"):
        topk_accuracy(logits, labels[:3])


def test_agreement_from_logits_values() -> None:
    fp = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    same = agreement_from_logits(fp, fp.clone())
    assert same == {"top1_agreement": 1.0, "kl": 0.0, "logit_cosine": pytest.approx(1.0), "n": 2}
    flipped = agreement_from_logits(fp, fp.flip(1))
    assert flipped["top1_agreement"] == 0.0
    p = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), 0)
    kl0 = float((p * (p.log() - p.flip(0).log())).sum())  # KL(fp || q) of row 0
    p1 = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    kl1 = float((p1 * (p1.log() - p1.flip(0).log())).sum())
    assert flipped["kl"] == pytest.approx((kl0 + kl1) / 2, rel=1e-9)
    assert flipped["logit_cosine"] == pytest.approx(0.0, abs=1e-12)


def test_quantized_agreement_orders_presets() -> None:
    """W8A8 agrees with FP better than W4A4 on the same inputs (mean KL and logit cosine)."""
    x = torch.randn(32, 3, 8, 8)
    fp = tiny_classifier()
    res = {}
    for preset in ("w8a8", "w4a4"):
        q = vqsuite.quantize_model(tiny_classifier(), preset)
        res[preset] = agreement(fp, q, x, batch_size=16, progress=False)
    assert res["w8a8"]["n"] == 32
    assert res["w8a8"]["kl"] < res["w4a4"]["kl"]
    assert res["w8a8"]["logit_cosine"] > res["w4a4"]["logit_cosine"] > 0.9


def test_labelled_folder_with_timm_preprocessing(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        save_images(torch.randint(0, 256, (3, 3, 40, 48), generator=g, dtype=torch.uint8), tmp_path / cls)
    files, labels, classes = labelled_folder(tmp_path)
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 0, 0, 1, 1, 1] and len(files) == 6
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=2).eval()
    tf = timm_transform(model)
    res = evaluate_accuracy(model, tmp_path, transform=tf, batch_size=4, progress=False)
    logits = collect_logits(model, files, transform=tf, batch_size=6, progress=False)
    assert res == topk_accuracy(logits, labels, (1, 5))
    assert logits.shape == (6, 2) and torch.isfinite(logits).all()
    x = torch.stack([tf(__import__("PIL.Image", fromlist=["Image"]).open(f).convert("RGB")) for f in files])
    assert x.shape[-2:] == tuple(timm.data.resolve_data_config({}, model=model)["input_size"][1:])


def test_accuracy_errors(tmp_path) -> None:
    model = tiny_classifier()
    with pytest.raises(ValueError, match="labels are needed"):
        evaluate_accuracy(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(FileNotFoundError):
        labelled_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        labelled_folder(tmp_path / "flat")
    assert math.isfinite(evaluate_accuracy(model, torch.randn(4, 3, 8, 8), torch.zeros(4).long())["top1"])
