"""Fidelity to the FP self: PSNR/SSIM, FID vs FP beside the floor, per-layer SQNR, and seeded pipeline sampling."""

from __future__ import annotations

import math

import pytest
import torch
from evals_helpers import TinyClassifier, TinyExtractor, tiny_classifier

import vqsuite
from vqsuite.evals.fidelity import image_fidelity, layer_sqnr, paired_metrics, sample_pipeline, sqnr_db, sqnr_table

#: torchmetrics keeps PSNR state in float32: relative agreement with the exact value
PSNR_RTOL = 1e-6
#: W8A8 per-layer output SQNR floor on the tiny classifier (dB); INT8 RTN gives ~45 dB here
W8A8_MIN_SQNR_DB = 35.0


def test_paired_metrics_known_values() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(20, 236, (3, 3, 16, 16), generator=g, dtype=torch.uint8)
    same = paired_metrics(ref, ref)
    assert same["psnr"] == 200.0 and same["ssim"] == pytest.approx(1.0) and same["n"] == 3
    noisy = (ref.int() + 8).clamp(0, 255).to(torch.uint8)  # a constant +8 offset: MSE = (8/255)^2 exactly
    assert paired_metrics(ref, noisy)["psnr"] == pytest.approx(10 * math.log10((255 / 8) ** 2), rel=PSNR_RTOL)
    with pytest.raises(ValueError, match="differ in shape"):
        paired_metrics(ref, ref[:2])


def _flat_colours(n: int, seed: int) -> torch.Tensor:
    """Images of one random colour each, plus a little noise: their features differ from image to image."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(30, 226, (n, 3, 1, 1), generator=g)
    return (colours + torch.randint(-20, 21, (n, 3, 12, 12), generator=g)).clamp(0, 255).to(torch.uint8)


def test_image_fidelity_fid_beside_floor() -> None:
    fp, floor = _flat_colours(12, 1), _flat_colours(12, 2)
    q = fp // 3  # a strong, systematic change (much darker)
    ext = TinyExtractor()
    out = image_fidelity(fp, q, floor, extractor=ext, progress=False)
    assert set(out) >= {"psnr", "ssim", "fid_vs_fp", "fid_floor", "fid_n", "fid_resize"}
    assert out["fid_n"] == 12 and out["fid_vs_fp"] > 2 * out["fid_floor"] > 0
    assert image_fidelity(fp, fp, floor, extractor=ext, progress=False)["fid_vs_fp"] == pytest.approx(0.0, abs=1e-9)


def test_layer_sqnr_table() -> None:
    x = torch.randn(8, 3, 8, 8)
    fp = tiny_classifier()
    q8 = vqsuite.quantize_model(tiny_classifier(), "w8a8")
    q4 = vqsuite.quantize_model(tiny_classifier(), "w4a4")
    r8, r4 = layer_sqnr(fp, q8, x), layer_sqnr(fp, q4, x)
    assert [r.name for r in r8] == ["conv", "fc1", "head"]
    assert min(r.sqnr_db for r in r8) > W8A8_MIN_SQNR_DB
    assert all(a.sqnr_db > b.sqnr_db for a, b in zip(r8, r4))
    local = layer_sqnr(fp, q4, x, mode="local")
    # the head sees the error of every layer before it when propagated, only its own when local
    assert local[-1].sqnr_db > r4[-1].sqnr_db
    assert layer_sqnr(fp, TinyClassifier().eval(), x, names=["fc1"])[0].sqnr_db == math.inf
    table = sqnr_table(r8)
    assert table.startswith("| layer | type | SQNR (dB) |") and "| fc1 |" in table and "3 layers" in table
    with pytest.raises(ValueError, match="missing"):
        layer_sqnr(fp, q8, x, names=["nope"])
    assert sqnr_db(torch.ones(4), torch.ones(4) * 1.1) == pytest.approx(20.0)


def test_sample_pipeline_seeded_and_batch_independent() -> None:
    tiny_pipelines = pytest.importorskip("tiny_pipelines")
    pipe = tiny_pipelines.ddpm(32)
    pipe.set_progress_bar_config(disable=True)
    a = sample_pipeline(pipe, [3, 4, 5], num_inference_steps=2, batch_size=3, progress=False)
    b = sample_pipeline(pipe, [3, 4, 5], num_inference_steps=2, batch_size=1, progress=False)
    c = sample_pipeline(pipe, [6], num_inference_steps=2, batch_size=1, progress=False)
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.uint8
    assert (a.int() - b.int()).abs().max() <= 1  # same seeds, other batching: round-off at most
    assert not torch.equal(a[0], c[0])


def test_sample_text_pipeline_and_quantized_fidelity() -> None:
    """A tiny SD pipeline: the same seeds give the same FP images; the W8A8 copy stays close (PSNR)."""
    tp = pytest.importorskip("tiny_pipelines")
    fp_pipe = tp.sd15(64)
    fp_pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, batch_size=2, progress=False, height=32, width=32)
    fp = sample_pipeline(fp_pipe, [0, 1], ["a red cat"], **kw)
    assert torch.equal(fp, sample_pipeline(fp_pipe, [0, 1], ["a red cat"], **kw))
    q_pipe = tp.quantize("sd15", "w8a8")
    q_pipe.set_progress_bar_config(disable=True)
    q = sample_pipeline(q_pipe, [0, 1], ["a red cat"], **kw)
    m = paired_metrics(fp, q)
    assert m["psnr"] > 25.0 and m["ssim"] > 0.8
