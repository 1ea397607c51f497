"""Mixed-precision bit allocation under an average-bits budget (MixDQ's integer program, METHODS.md §7).

Binary ``c[i, b]`` picks candidate ``b`` for layer ``i``; ``sum_b c[i, b] = 1``; the parameter-weighted average
weight bits ``sum c[i, b] * bits_b * w_i / sum w`` lies within ``tolerance`` of the budget (at most the budget if
that band is infeasible); maximize the summed sensitivity score ``sum c[i, b] * s[i, b]``. Solved exactly with
``scipy.optimize.milp`` (HiGHS branch and bound). The result is a :class:`~vqsuite.config.QuantConfig` with one
exact-name override per layer, which ``quantize_model`` and ``quantize_pipeline`` accept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vqsuite.calibrators.sensitivity import Sensitivity, layer_sensitivity, output_runner
from vqsuite.config import QuantConfig, QuantSpec, get_preset, resolve_config
from vqsuite.errors import UserError
from vqsuite.formats import get_format

logger = logging.getLogger(__name__)

#: MixDQ's budget band: |average bits - budget| <= 0.02
DEFAULT_TOLERANCE = 0.02


def spec_bits(spec: QuantSpec | None) -> float:
    """Nominal weight bits of a recipe (16 for float weights)."""
    if spec is None or spec.weight is None:
        return 16.0
    return float(get_format(spec.weight).bits)


def candidate_specs(candidates: Sequence[str | QuantSpec | QuantConfig] | dict[str, Any]) -> dict[str, QuantSpec]:
    """Name -> recipe for preset names, specs (named by ``spec.short()``) or configs (their default)."""
    items = candidates.items() if isinstance(candidates, dict) else [(None, c) for c in candidates]
    out: dict[str, QuantSpec] = {}
    for name, c in items:
        if isinstance(c, str):
            spec, label = get_preset(c).default, c
        elif isinstance(c, QuantSpec):
            spec, label = c, c.short()
        else:
            spec, label = resolve_config(c).default, getattr(c, "name", None) or resolve_config(c).default.short()
        out[name or label] = spec
    if len(out) < 1:
        raise UserError("candidates is empty")
    return out


@dataclass
class Allocation:
    """The solved program: ``choice[layer] = candidate``, ``avg_bits`` (parameter-weighted), ``score`` (summed)."""

    choice: dict[str, str]
    avg_bits: float
    score: float
    budget_bits: float
    status: str

    def average_bits(self, sens: Sensitivity) -> float:
        return average_bits(self.choice, sens)


def average_bits(choice: dict[str, str], sens: Sensitivity) -> float:
    """Parameter-weighted average weight bits of ``choice``."""
    total = sum(sens.numel[n] for n in choice)
    return sum(spec_bits(sens.specs[c]) * sens.numel[n] for n, c in choice.items()) / total


def solve_allocation(
    sens: Sensitivity, budget_bits: float, tolerance: float = DEFAULT_TOLERANCE, time_limit: float | None = 60.0
) -> Allocation:
    """The exact optimum of the integer program in the module docstring over ``sens``'s layers and candidates."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers = sorted(sens.scores)
    cands = list(sens.specs)
    if not layers:
        raise UserError("no layer to allocate")
    n_l, n_c = len(layers), len(cands)
    bits = np.array([spec_bits(sens.specs[c]) for c in cands])
    w = np.array([sens.numel[n] for n in layers], dtype=np.float64)
    w = w / w.sum()
    score = np.array([[sens.scores[n].get(c, -np.inf) for c in cands] for n in layers])
    if not np.isfinite(score).all():
        raise ValueError("every layer needs a finite score for every candidate")
    lo_bits, hi_bits = float(bits.min()), float(bits.max())
    if budget_bits < lo_bits - 1e-12:
        raise UserError(f"budget_bits={budget_bits} is below the smallest candidate ({lo_bits} bits)")
    one = np.zeros((n_l, n_l * n_c))
    for i in range(n_l):
        one[i, i * n_c : (i + 1) * n_c] = 1.0
    avg_row = (w[:, None] * bits[None, :]).reshape(1, -1)
    c = -score.reshape(-1)
    opts = {"time_limit": time_limit} if time_limit else {}

    def solve(lo: float, hi: float):
        cons = [LinearConstraint(one, 1.0, 1.0), LinearConstraint(avg_row, lo, hi)]
        return milp(c, constraints=cons, integrality=np.ones_like(c), bounds=Bounds(0, 1), options=opts)

    res = solve(budget_bits - tolerance, budget_bits + tolerance)
    status = "within tolerance"
    if res.x is None:
        logger.warning(
            "no allocation within %.3f bits of budget_bits=%.3f (candidates %s..%s bits); solving for <= budget",
            tolerance,
            budget_bits,
            lo_bits,
            hi_bits,
        )
        res = solve(-np.inf, budget_bits)
        status = "at most budget"
    if res.x is None:
        raise UserError(f"the allocation program is infeasible: {res.message}")
    x = np.round(res.x).reshape(n_l, n_c)
    choice = {n: cands[int(x[i].argmax())] for i, n in enumerate(layers)}
    return Allocation(choice, average_bits(choice, sens), sens.total(choice), budget_bits, status)


def allocation_config(
    alloc: Allocation,
    sens: Sensitivity,
    *,
    base: QuantConfig | None = None,
    fp16_act_layers: Sequence[str] = (),
    name: str | None = None,
) -> QuantConfig:
    """A config with one exact-name override per allocated layer (before ``base``'s own overrides)."""
    overrides: list[tuple[str, QuantSpec | None]] = []
    for layer, cand in sorted(alloc.choice.items()):
        spec = sens.specs[cand]
        if layer in fp16_act_layers and spec.act is not None:
            spec = spec.replace(
                act=None,
                act_mode="none",
                act_group_size=None,
                act_granularity="pooled",
                n_buckets=None,
                act_range="minmax",
            )
        overrides.append((_escape(layer), spec))
    default = base.default if base is not None else sens.specs[min(sens.specs, key=lambda k: spec_bits(sens.specs[k]))]
    extra = tuple(base.overrides) if base is not None else ()
    return QuantConfig(
        default=default,
        overrides=tuple(overrides) + extra,
        exclude=tuple(base.exclude) if base is not None else (),
        name=name or f"mixed-{alloc.avg_bits:.2f}b",
    )


def _escape(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


@torch.no_grad()
def allocate_bits(
    model_or_pipe: Any,
    budget_bits: float = 4.5,
    candidates: Sequence[str | QuantSpec] | dict[str, QuantSpec] = ("w4a8", "w8a8"),
    calib_data: Any = None,
    *,
    run: Any = None,
    tolerance: float = DEFAULT_TOLERANCE,
    keep_fp16_acts: float = 0.0,
    layers: Sequence[str] | None = None,
    sensitivity: Sensitivity | None = None,
    num_inference_steps: int = 4,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
    pipe_kwargs: dict[str, Any] | None = None,
    return_details: bool = False,
) -> QuantConfig | tuple[QuantConfig, Allocation, Sensitivity]:
    """Mixed-precision recipe for a model or a diffusers pipeline under an average weight-bits budget.

    Args:
        model_or_pipe: an ``nn.Module`` (scored on its output over ``calib_data`` or by ``run``) or a diffusers
            pipeline (scored on the images of a short seeded run; content layers by SSIM, others by SQNR).
        budget_bits: the parameter-weighted average weight bits to meet (within ``tolerance``).
        candidates: preset names or specs; their weight bits are the costs.
        calib_data: model inputs (as ``quantize_model`` takes them), for a module without ``run``.
        run: ``run(model) -> tensor`` scoring function input (overrides ``calib_data``).
        keep_fp16_acts: fraction of the allocated layers (most activation-sensitive first) whose activations stay
            16-bit, measured by quantizing only that layer's activations in its chosen format.
        layers: only these layer names take part (default: every layer all candidates fit; for a pipeline, those
            its architecture rule quantizes).
        sensitivity: a precomputed :class:`Sensitivity` (skips the measurement).
        num_inference_steps, seed, prompts, pipe_kwargs: the pipeline scoring run.
        return_details: also return the :class:`Allocation` and :class:`Sensitivity`.
    """
    specs = candidate_specs(candidates)
    is_pipe = not isinstance(model_or_pipe, nn.Module)
    base = None
    image_output = False
    if is_pipe:
        from vqsuite.pipelines.diffusers import find_denoiser
        from vqsuite.pipelines.rules import denoiser_config

        pipe = model_or_pipe
        _, model = find_denoiser(pipe)
        base = denoiser_config(model, QuantConfig(default=next(iter(specs.values()))))
        if layers is None:
            layers = [n for n, _ in model.named_modules() if n and base.spec_for(n) is not None]
        if run is None:
            run = _pipeline_runner(pipe, num_inference_steps, seed, prompts, pipe_kwargs or {})
            image_output = True
        base = QuantConfig(default=base.default, exclude=base.exclude)
    else:
        model = model_or_pipe
        if run is None:
            if calib_data is None:
                raise UserError("pass calib_data (model inputs) or run= to score the layers")
            run = output_runner(calib_data)
    if sensitivity is None:
        scorer = run if not is_pipe else (lambda _m: run(pipe))
        sensitivity = layer_sensitivity(model, specs, scorer, layers=layers, image_output=image_output)
    alloc = solve_allocation(sensitivity, budget_bits, tolerance)
    fp16 = []
    if keep_fp16_acts > 0:
        fp16 = _most_act_sensitive(
            model, alloc, sensitivity, run if not is_pipe else (lambda _m: run(pipe)), keep_fp16_acts, image_output
        )
    cfg = allocation_config(alloc, sensitivity, base=base, fp16_act_layers=fp16)
    logger.info(
        "allocate_bits: %d layers, %.3f average bits (budget %.3f, %s), score %.2f dB; %d layer(s) keep 16-bit acts",
        len(alloc.choice),
        alloc.avg_bits,
        budget_bits,
        alloc.status,
        alloc.score,
        len(fp16),
    )
    return (cfg, alloc, sensitivity) if return_details else cfg


def _most_act_sensitive(
    model: nn.Module, alloc: Allocation, sens: Sensitivity, run: Any, fraction: float, image_output: bool
) -> list[str]:
    """The ``fraction`` of allocated layers whose activation quantization (alone) costs the most."""
    act_specs: dict[str, QuantSpec] = {}
    act_score: dict[str, float] = {}
    for layer, cand in alloc.choice.items():
        spec = sens.specs[cand]
        if spec.act is None:
            continue
        act_only = spec.replace(weight=None, weight_group_size=None, rank=0)
        act_specs[layer] = act_only
    for layer, spec in act_specs.items():
        s = layer_sensitivity(model, {"act": spec}, run, layers=[layer], image_output=image_output)
        if layer in s.scores:
            act_score[layer] = s.scores[layer]["act"]
    k = int(round(fraction * len(alloc.choice)))
    return sorted(act_score, key=lambda n: act_score[n])[:k]


def _pipeline_runner(pipe: Any, steps: int, seed: int, prompts: Sequence[str] | None, kwargs: dict[str, Any]):
    from vqsuite.pipelines.diffusers import calibration_kind

    kind = calibration_kind(pipe)
    prompts = list(prompts) if prompts else ["a photo of a cat"]

    def run(p: Any) -> torch.Tensor:
        if hasattr(p, "set_progress_bar_config"):
            p.set_progress_bar_config(disable=True)
        g = torch.Generator(device="cpu").manual_seed(seed)
        kw = dict(num_inference_steps=steps, generator=g, output_type="pt", **kwargs)
        if kind == "text":
            out = p(prompt=prompts, **kw)
        elif kind == "class":
            out = p(class_labels=list(range(len(prompts))), **kw)
        else:
            out = p(batch_size=len(prompts), **kw)
        return out.images.detach().float().cpu()

    return run
