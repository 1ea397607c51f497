"""Shared runner of the architecture-coverage checks (tests/coverage and benchmarks/coverage.py).

A *case* is a builder ``build() -> (model, inputs)``: a small float model in eval mode and the inputs of one
forward (a tuple of positional args or a dict of keyword args). :func:`run_case` runs it in float, quantizes it
with one preset (a diffusers denoiser through its architecture rule, as ``quantize_pipeline`` does), runs it
again and returns a :class:`CaseResult`: status, quantized fraction of the matrix weights, SQNR of the output
against float, and the exception's first line if anything raised.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

#: the presets every architecture is run with: the generic ones plus SVDQuant
GENERIC_PRESETS: tuple[str, ...] = (
    "w8a16",
    "w4a16",
    "w8a8",
    "w4a8",
    "w4a4",
    "w8a8-fp8",
    "w4a16-nvfp4",
    "nvfp4",
    "mxfp4",
    "w4a8-static",
    "svdquant-int4",
)

#: SVDQuant search trimmed for coverage runs (a 3-point smoothing grid, one low-rank pass): the path is under test
#: (calibrate, pack, low-rank forward), not the search; the full search costs ~140 SVDs per layer group
FAST_SVDQUANT_OPTIONS: tuple[tuple[str, Any], ...] = (("num_grids", 2), ("lowrank_iters", 1))

Inputs = tuple | dict
Builder = Callable[[], tuple[nn.Module, Inputs]]


@dataclass
class CaseResult:
    """One (architecture, preset) run.

    Attributes:
        name: the case (timm model name or diffusers class name).
        preset: the preset it was quantized with.
        status: ``"ok"`` (quantized something, finite output), ``"noop"`` (quantized nothing),
            ``"nonfinite"`` (output has NaN/Inf), ``"error"`` (an exception; see ``error``).
        fraction: quantized fraction of the matrix weights (0..1).
        sqnr_db: output SQNR vs float in dB (``inf`` if identical, ``nan`` if not computed).
        error: ``"Type: first line"`` of the exception, or ``""``.
        skipped: ``{reason: count}`` of the layers the report skipped.
        seconds: wall time of quantize + forward.
    """

    name: str
    preset: str
    status: str
    fraction: float = 0.0
    sqnr_db: float = float("nan")
    error: str = ""
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def first_tensor(out: Any) -> torch.Tensor:
    """The main output tensor of a forward: a tensor, ``.sample``, or the first tensor in a tuple/list/dict."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            try:
                return first_tensor(o)
            except TypeError:
                continue
    if hasattr(out, "to_tuple"):
        return first_tensor(out.to_tuple())
    raise TypeError(f"no tensor in the output ({type(out).__name__})")


def forward(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """``model(*inputs)`` or ``model(**inputs)``; the main output tensor."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return first_tensor(out)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    noise = (ref - out).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def run_case(
    name: str, build: Builder, preset: str, *, denoiser: bool = False, seed: int = 0, fast_svdquant: bool = True
) -> CaseResult:
    """Build, run in float, quantize with ``preset``, run again; never raises (errors go in the result).

    ``denoiser=True`` folds the model's diffusers architecture rule into the preset (``denoiser_config``), as
    ``quantize_pipeline`` does. Calibrating presets (static scales, SVDQuant) calibrate on the case's own input;
    ``fast_svdquant`` trims SVDQuant's search to :data:`FAST_SVDQUANT_OPTIONS` (``False``: the preset's own).
    """
    from vqsuite import quantize_model
    from vqsuite.config import resolve_config
    from vqsuite.pipelines.rules import denoiser_config

    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        model, inputs = build()
        model.eval()
        ref = forward(model, inputs)
        config = resolve_config(preset)
        if fast_svdquant and config.method == "svdquant":
            config = replace(config, method_options=dict(config.method_options) | dict(FAST_SVDQUANT_OPTIONS))
        config = denoiser_config(model, config) if denoiser else config
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            try:
                quantize_model(model, config, calib_data=lambda m: forward(m, inputs))
            finally:
                logging.disable(logging.NOTSET)
        report = model.vqsuite_report
        out = forward(model, inputs)
    except Exception as e:  # noqa: BLE001 - the point is to record any failure
        tb = traceback.extract_tb(e.__traceback__)
        where = f" [{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}]" if tb else ""
        line = (str(e).strip().splitlines() or [""])[0][:300]
        return CaseResult(
            name, preset, "error", error=f"{type(e).__name__}: {line}{where}", seconds=time.perf_counter() - t0
        )
    skipped: dict[str, int] = {}
    for entry in report.skipped:
        skipped[entry.reason] = skipped.get(entry.reason, 0) + 1
    fraction = float(report.quantized_fraction)
    if not torch.isfinite(out).all():
        status = "nonfinite"
    elif not report.quantized:
        status = "noop"
    else:
        status = "ok"
    return CaseResult(
        name,
        preset,
        status,
        fraction=fraction,
        sqnr_db=sqnr_db(ref, out) if out.shape == ref.shape else float("nan"),
        skipped=skipped,
        seconds=time.perf_counter() - t0,
    )
