"""Fidelity of a quantized model or pipeline to its full-precision self.

Pipelines: the same seeds through the FP and the quantized pipeline, compared pairwise (PSNR, SSIM through
torchmetrics, images in [0, 1]) and as sets (FID between the quantized and the FP samples, printed beside the
FP-vs-FP floor: FID between two FP sample sets with different seeds, the value a perfect quantization would still
show at this N). Models: per-layer SQNR of a quantized model's layer outputs against its float twin's, matched by
module name.

API::

    fp = sample_pipeline(fp_pipe, seeds=range(16), prompts=["a cat"], num_inference_steps=20)   # uint8 [16,3,H,W]
    q = sample_pipeline(q_pipe, seeds=range(16), prompts=["a cat"], num_inference_steps=20)
    floor = sample_pipeline(fp_pipe, seeds=range(1000, 1016), prompts=["a cat"], num_inference_steps=20)
    paired_metrics(fp, q)                                   # {"psnr": dB, "ssim": .., "n": 16}
    image_fidelity(fp, q, floor, extractor=load_inception())  # + "fid_vs_fp", "fid_floor" (+ "resize")
    rows = layer_sqnr(float_model, quant_model, inputs)     # [LayerSQNR(name, type, sqnr_db, numel)]
    print(sqnr_table(rows))                                 # markdown
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vqsuite.errors import UserError
from vqsuite.evals.distributed import sharded_map
from vqsuite.evals.inception import RESIZE, to_uint8_nchw

logger = logging.getLogger(__name__)

#: seeds of the FP-vs-FP floor set start here (far from the usual 0..N-1 evaluation seeds)
FLOOR_SEED_OFFSET = 1_000_000


# ------------------------------------------------------------------------------------------------ sampling
def _call_params(pipe: Any) -> set[str]:
    try:
        return set(inspect.signature(pipe.__call__).parameters)
    except (TypeError, ValueError):
        return set()


@torch.no_grad()
def sample_pipeline(
    pipe: Any,
    seeds: Iterable[int],
    prompts: Sequence[str] | None = None,
    *,
    class_labels: Sequence[int] | None = None,
    num_inference_steps: int | None = None,
    batch_size: int = 4,
    accelerator: Any = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]``: image ``i`` from ``torch.Generator().manual_seed(seeds[i])``.

    Text-to-image pipelines get ``prompts[i % len(prompts)]``; class-conditional ones (DiT: ``class_labels`` in
    the call) ``class_labels[i % ...]`` (default ``i % 10``); unconditional ones (DDPM) just ``batch_size``. One
    generator per image, so an image does not depend on the batch it was drawn in (up to float round-off in
    batched kernels); with an ``accelerator`` the seeds are spread over processes and gathered in order.
    """
    seeds = list(seeds)
    params = _call_params(pipe)
    steps = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}

    def run(idx: list[int]) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(int(seeds[i])) for i in idx]
        kw: dict[str, Any] = dict(generator=gens, output_type="np", **steps, **call_kwargs)
        if "prompt" in params and prompts:
            kw["prompt"] = [prompts[i % len(prompts)] for i in idx]
        elif "class_labels" in params:
            labels = class_labels or list(range(10))
            kw["class_labels"] = [int(labels[i % len(labels)]) for i in idx]
        elif "batch_size" in params:
            kw["batch_size"] = len(idx)
        elif "prompt" in params:
            raise UserError(f"{type(pipe).__name__} needs prompts")
        images = pipe(**kw).images
        return to_uint8_nchw(torch.as_tensor(images))

    return sharded_map(
        run, len(seeds), batch_size=batch_size, accelerator=accelerator, desc="sampling", progress=progress
    )


# ------------------------------------------------------------------------------------------------ image metrics
def paired_metrics(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """PSNR (dB, mean over images) and SSIM (mean) of ``test`` against ``reference``, both uint8 ``[N, 3, H, W]``
    (or float in [0, 1]) with the same seeds in the same order; data range 1.0."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    ref = to_uint8_nchw(reference).double() / 255
    out = to_uint8_nchw(test).double() / 255
    if ref.shape != out.shape:
        raise UserError(f"image sets differ in shape: {tuple(ref.shape)} vs {tuple(out.shape)}")
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="none", dim=(1, 2, 3))(out, ref)
    psnr = psnr.clamp(max=200.0)  # identical images: inf -> a finite, obviously perfect value
    ks = min(11, ref.shape[-1] - (1 - ref.shape[-1] % 2), ref.shape[-2] - (1 - ref.shape[-2] % 2))
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=ks)(out, ref)
    return {"psnr": float(psnr.mean()), "ssim": float(ssim), "n": int(ref.shape[0])}


def image_fidelity(
    fp: torch.Tensor,
    quantized: torch.Tensor,
    fp_floor: torch.Tensor | None = None,
    *,
    extractor: Any = None,
    fp_stats: Any = None,
    batch_size: int = 16,
    accelerator: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """PSNR/SSIM of ``quantized`` vs ``fp`` (same seeds) and, with an ``extractor``, ``fid_vs_fp`` =
    FID(fp, quantized) beside ``fid_floor`` = FID(fp, fp_floor) (FP samples with other seeds), same N.

    ``fp_stats`` (a :class:`~vqsuite.evals.fid.FeatureStats` of ``fp``) skips re-extracting the FP features
    in a sweep.
    """
    out: dict[str, Any] = paired_metrics(fp, quantized)
    if extractor is None:
        return out
    from vqsuite.evals.fid import FeatureStats, extract_features, extractor_name, frechet_distance

    kw = dict(batch_size=batch_size, accelerator=accelerator, progress=progress)
    name = extractor_name(extractor)
    ref = fp_stats or FeatureStats.from_features(extract_features(fp, extractor, desc="features fp", **kw), name)
    q = FeatureStats.from_features(extract_features(quantized, extractor, desc="features quantized", **kw), name)
    out["fid_vs_fp"] = frechet_distance(ref.mu, ref.sigma, q.mu, q.sigma)
    if fp_floor is not None:
        fl = FeatureStats.from_features(extract_features(fp_floor, extractor, desc="features floor", **kw), name)
        out["fid_floor"] = frechet_distance(ref.mu, ref.sigma, fl.mu, fl.sigma)
    out["fid_n"] = int(q.n)
    out["fid_resize"] = RESIZE
    out["fid_extractor"] = name
    return out


# ------------------------------------------------------------------------------------------------ layer SQNR
@dataclass
class LayerSQNR:
    """One layer's output SQNR (dB) against the float twin; ``inf`` when identical."""

    name: str
    type: str
    sqnr_db: float
    numel: int


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """``10 log10(sum ref^2 / sum (ref - test)^2)`` in float64; ``inf`` when equal."""
    ref, test = ref.double(), test.double()
    noise = (ref - test).square().sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.square().sum() / noise))


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def _default_names(float_model: nn.Module, quant_model: nn.Module) -> list[str]:
    from vqsuite.nn import QuantLayer

    float_names = {n for n, _ in float_model.named_modules()}
    return [n for n, m in quant_model.named_modules() if isinstance(m, QuantLayer) and n in float_names]


@torch.no_grad()
def layer_sqnr(
    float_model: nn.Module,
    quant_model: nn.Module,
    inputs: Any,
    names: Sequence[str] | None = None,
    *,
    mode: str = "propagated",
) -> list[LayerSQNR]:
    """Per-layer output SQNR of ``quant_model`` against ``float_model`` on ``inputs``.

    Args:
        inputs: a tensor, a tuple of positional args, or a dict of keyword args for both models' forward.
        names: module names present in both models (default: every quantized layer of ``quant_model``).
        mode: ``"propagated"``: each model runs on ``inputs`` end to end, so a layer's SQNR includes the error of
            every layer before it (what the model really sees); ``"local"``: each quantized layer gets the float
            model's input to that layer (its own error only).
    """
    if mode not in ("propagated", "local"):
        raise UserError(f"{mode=} must be 'propagated' or 'local'")
    names = list(names) if names is not None else _default_names(float_model, quant_model)
    fmods, qmods = dict(float_model.named_modules()), dict(quant_model.named_modules())
    missing = [n for n in names if n not in fmods or n not in qmods]
    if missing:
        raise UserError(f"modules missing from one of the models: {missing[:5]}")
    ref_out: dict[str, torch.Tensor] = {}
    ref_in: dict[str, tuple] = {}

    def call(model: nn.Module) -> None:
        if isinstance(inputs, dict):
            model(**inputs)
        elif isinstance(inputs, tuple):
            model(*inputs)
        else:
            model(inputs)

    def ref_hook(name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            t = _first_tensor(out)
            if t is not None and name not in ref_out:  # first call of a reused module
                ref_out[name] = t.detach().cpu()
                if mode == "local":
                    ref_in[name] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

        return hook

    handles = [fmods[n].register_forward_hook(ref_hook(n)) for n in names]
    try:
        float_model.eval()
        call(float_model)
    finally:
        for h in handles:
            h.remove()
    rows: list[LayerSQNR] = []
    if mode == "local":
        for n in names:
            if n in ref_in:
                t = _first_tensor(qmods[n](*ref_in[n]))
                rows.append(LayerSQNR(n, type(qmods[n]).__name__, sqnr_db(ref_out[n], t.cpu()), ref_out[n].numel()))
        return rows
    got: dict[str, torch.Tensor] = {}

    def q_hook(name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            t = _first_tensor(out)
            if t is not None and name not in got:
                got[name] = t.detach().cpu()

        return hook

    handles = [qmods[n].register_forward_hook(q_hook(n)) for n in names]
    try:
        quant_model.eval()
        call(quant_model)
    finally:
        for h in handles:
            h.remove()
    for n in names:
        if n in ref_out and n in got:
            rows.append(LayerSQNR(n, type(qmods[n]).__name__, sqnr_db(ref_out[n], got[n]), ref_out[n].numel()))
    return rows


def sqnr_table(rows: Sequence[LayerSQNR]) -> str:
    """A markdown table of :func:`layer_sqnr` rows, plus the minimum and the median."""
    lines = ["| layer | type | SQNR (dB) |", "|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.type} | {r.sqnr_db:.2f} |")
    if rows:
        vals = sorted(r.sqnr_db for r in rows)
        lines.append(f"\n{len(rows)} layers; min {vals[0]:.2f} dB, median {vals[len(vals) // 2]:.2f} dB")
    return "\n".join(lines)
