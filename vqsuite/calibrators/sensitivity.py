"""Per-layer quantization sensitivity (MixDQ's metric-decoupled analysis, METHODS.md §7).

Quantize one layer at a time at each candidate recipe, rerun the model (or pipeline) and score its output against
the float output. Scores are "higher is better" in dB so they add up across layers:

- quality-related layers: SQNR of the output, ``10 log10(sum ref^2 / sum (ref - out)^2)``;
- content-related layers (cross-attention ``attn2``, feed-forward ``ff``; MixDQ's split), when the output is an
  image batch: SSIM against the float image, as ``-10 log10(1 - SSIM)``.

Both are capped at :data:`MAX_SCORE_DB` (an exact match would be infinite).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqsuite.config import QuantSpec
from vqsuite.errors import UserError

logger = logging.getLogger(__name__)

#: scores are capped here (identical outputs)
MAX_SCORE_DB = 100.0
#: MixDQ's content-related layers: cross-attention and feed-forward
CONTENT_PATTERNS: tuple[str, ...] = ("*attn2*", "*.ff.*", "*.ff", "*ff.net*")
#: SSIM constants (Wang et al. 2004) and window
SSIM_K1, SSIM_K2, SSIM_WINDOW = 0.01, 0.03, 7

RunFn = Callable[[nn.Module], torch.Tensor]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``10 log10(sum ref^2 / sum (ref - out)^2)`` in float64, capped at :data:`MAX_SCORE_DB`."""
    r, o = ref.detach().double(), out.detach().double()
    noise = float((r - o).pow(2).sum())
    signal = float(r.pow(2).sum())
    if noise == 0.0:
        return MAX_SCORE_DB
    if signal == 0.0:
        return -MAX_SCORE_DB
    return min(10 * math.log10(signal / noise), MAX_SCORE_DB)


def _nchw(img: torch.Tensor) -> torch.Tensor:
    x = img.detach().double()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise UserError(f"images must be [B, C, H, W] or [B, H, W, C], got shape {tuple(img.shape)}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    return x


def ssim(ref: torch.Tensor, out: torch.Tensor, data_range: float | None = None) -> float:
    """Mean SSIM of two image batches (``[B, C, H, W]`` or ``[B, H, W, C]``), uniform 7x7 window (or the image
    size if smaller), ``data_range`` = the reference's max - min when not given."""
    a, b = _nchw(ref), _nchw(out)
    if a.shape != b.shape:
        raise UserError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    rng = float(a.max() - a.min()) if data_range is None else float(data_range)
    rng = rng or 1.0
    c1, c2 = (SSIM_K1 * rng) ** 2, (SSIM_K2 * rng) ** 2
    k = min(SSIM_WINDOW, a.shape[-1], a.shape[-2])

    def pool(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, k, stride=1)

    mu_a, mu_b = pool(a), pool(b)
    var_a = pool(a * a) - mu_a**2
    var_b = pool(b * b) - mu_b**2
    cov = pool(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def ssim_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """SSIM as a dB score, ``-10 log10(1 - SSIM)``, capped at :data:`MAX_SCORE_DB`."""
    gap = 1.0 - ssim(ref, out)
    return MAX_SCORE_DB if gap <= 10 ** (-MAX_SCORE_DB / 10) else min(-10 * math.log10(gap), MAX_SCORE_DB)


def is_content_layer(name: str, patterns: Sequence[str] = CONTENT_PATTERNS) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass
class Sensitivity:
    """``scores[layer][candidate]``: dB score of the output with only ``layer`` quantized by ``candidate``.

    ``numel[layer]``: its weight's element count; ``metric[layer]``: ``"sqnr"`` or ``"ssim"``; ``specs``: the
    candidates' recipes by name; ``baseline_db``: the score of the unquantized rerun (run-to-run noise).
    """

    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    metric: dict[str, str] = field(default_factory=dict)
    specs: dict[str, QuantSpec] = field(default_factory=dict)
    baseline_db: float = MAX_SCORE_DB

    def total(self, choice: dict[str, str]) -> float:
        """Summed score of an allocation ``{layer: candidate}``."""
        return sum(self.scores[n][c] for n, c in choice.items())


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from vqsuite.nn import QuantLayer

    out = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not name or isinstance(m, QuantLayer) or any(True for _ in m.children()):
            continue
        if isinstance(w, torch.Tensor) and w.ndim >= 2:
            out.append((name, m))
    return out


def _swap(model: nn.Module, names: list[str], new: nn.Module) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def candidate_layers(
    model: nn.Module, specs: dict[str, QuantSpec], layers: Iterable[str] | None = None
) -> dict[str, nn.Module]:
    """Layers (name -> float module) that every candidate in ``specs`` can quantize (optionally only ``layers``)."""
    from vqsuite.pipelines.modules import _rule_for

    wanted = None if layers is None else set(layers)
    out = {}
    for name, m in _weight_layers(model):
        if wanted is not None and name not in wanted:
            continue
        rule, _ = _rule_for(m)
        if rule is None:
            continue
        if all(rule[0](m, s) is None for s in specs.values()):
            out[name] = m
    return out


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    candidates: dict[str, QuantSpec],
    run: RunFn,
    *,
    layers: Iterable[str] | None = None,
    image_output: bool = False,
    content_patterns: Sequence[str] = CONTENT_PATTERNS,
) -> Sensitivity:
    """Score every layer of ``model`` at every candidate recipe, one layer quantized at a time.

    Args:
        model: a float model (its layers are swapped for fake-quant twins and back; it ends as it started).
        candidates: name -> recipe. Static-activation recipes are calibrated on the same ``run``.
        run: ``run(model) -> tensor``, deterministic (fixed seeds): the denoiser output, or generated images.
        layers: only these layer names (default: every layer all candidates can quantize).
        image_output: ``run`` returns images; content-related layers are then scored by SSIM (MixDQ).
    """
    from vqsuite.calibrators.timestep import calibrate_static_scales
    from vqsuite.pipelines.modules import _rule_for, module_references

    ref = run(model)
    sens = Sensitivity(specs=dict(candidates))
    sens.baseline_db = sqnr_db(ref, run(model))
    refs = module_references(model)
    targets = candidate_layers(model, candidates, layers)
    for name, module in targets.items():
        rule, _ = _rule_for(module)
        content = image_output and is_content_layer(name, content_patterns)
        metric = ssim_db if content else sqnr_db
        sens.metric[name] = "ssim" if content else "sqnr"
        sens.numel[name] = int(module.weight.numel())
        sens.scores[name] = {}
        for cname, spec in candidates.items():
            q = rule[1](module, spec)
            q.layer_name = name
            _swap(model, refs[id(module)], q)
            try:
                if spec.act_mode == "static":
                    calibrate_static_scales(model, {name: q}, lambda m: run(m))
                sens.scores[name][cname] = metric(ref, run(model))
            finally:
                _swap(model, refs[id(module)], module)
        logger.debug("sensitivity %s: %s", name, sens.scores[name])
    return sens


def output_runner(calib_data: Any) -> RunFn:
    """``run(model)``: every output tensor of ``model`` over ``calib_data`` (see
    :func:`~vqsuite.calibrators.data.run_calibration_data`), flattened and concatenated."""
    from vqsuite.calibrators.data import run_calibration_data

    def run(model: nn.Module) -> torch.Tensor:
        outs: list[torch.Tensor] = []

        def hook(_m: nn.Module, _a: tuple, out: Any) -> None:
            t = out
            if isinstance(t, (tuple, list)):
                t = t[0]
            if hasattr(t, "sample"):
                t = t.sample
            if isinstance(t, torch.Tensor):
                outs.append(t.detach().float().reshape(-1).cpu())

        h = model.register_forward_hook(hook)
        try:
            run_calibration_data(model, calib_data)
        finally:
            h.remove()
        if not outs:
            raise UserError("the model produced no tensor output over calib_data")
        return torch.cat(outs)

    return run
