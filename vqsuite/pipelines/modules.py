"""``quantize_model``: swap every supported layer of any ``nn.Module`` for its quantized twin.

Which float module becomes which quantized one is a small registry (``LAYER_RULES``); a layer is skipped, with
the reason in the report and a log line, when its type is unsupported, a subclass changes ``forward`` (and has no
layer adapter, :mod:`vqsuite.pipelines.layer_adapters`), the config excludes it, or its shape does not fit the spec
(e.g. a group that does not divide K). An adapted layer (timm ``StdConv2d``, ``Conv2dSame``, ...) is quantized as
the plain float layer its adapter gives (effective weight, dynamic padding).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vqsuite.calibrators.capture import capture_inputs
from vqsuite.calibrators.data import CalibData, run_calibration_data
from vqsuite.calibrators.ranges import search_weight_qtensor
from vqsuite.calibrators.timestep import attach_step_tracker, calibrate_static_scales, step_tracker_of
from vqsuite.config import QuantConfig, QuantSpec, resolve_config
from vqsuite.errors import ConfigError, UserError
from vqsuite.formats import get_format
from vqsuite.nn import (
    CONV_TWINS,
    FLOAT_CONV_TRANSPOSE_TYPES,
    FLOAT_CONV_TYPES,
    FLOAT_LOWRANK_CONV_TWINS,
    QLinear,
    QLinearLowRank,
    QuantLayer,
)
from vqsuite.pipelines.layer_adapters import LayerAdapter, accept_extra_args, adapter_for, effective_layer
from vqsuite.pipelines.report import (
    OVERRIDES_FORWARD,
    LayerEntry,
    QuantReport,
    matrix_weight_numel,
    module_nbytes,
    skip_reasons,
)

logger = logging.getLogger(__name__)

#: quantized fraction of matrix weights under which quantize_model warns that little was quantized
LOW_COVERAGE_WARN_FRACTION = 0.5


def _linear_rule(module: nn.Linear, spec: QuantSpec) -> QuantLayer:
    return (QLinearLowRank if spec.rank > 0 else QLinear).from_float(module, spec)


def _linear_reason(module: nn.Linear, spec: QuantSpec) -> str | None:
    if spec.rank > min(module.in_features, module.out_features):
        return f"rank={spec.rank} exceeds min(in_features, out_features)={min(module.in_features, module.out_features)}"
    return spec.incompatibility(module.in_features)


def _conv_gemm_k(module: nn.Module) -> int:
    """GEMM K of a float conv (any dims): ``I/g * prod(kernel)``, or ``I/g`` for a transposed conv."""
    if isinstance(module, FLOAT_CONV_TRANSPOSE_TYPES):
        return module.in_channels // module.groups
    return module.in_channels // module.groups * math.prod(module.kernel_size)


def _conv_branch_reason(module: nn.Module, spec: QuantSpec) -> str | None:
    """Why a conv cannot take ``spec``'s low-rank branch (grouped, or wider than its GEMM view), or ``None``."""
    if spec.rank == 0:
        return None
    if module.groups != 1:
        return f"groups={module.groups}: the low-rank branch needs groups=1"
    k = _conv_gemm_k(module)
    n = module.weight.numel() // k
    if spec.rank > min(n, k):
        return f"rank={spec.rank} exceeds min(N, K)={min(n, k)} of the conv's GEMM view [{n}, {k}]"
    return None


def _conv_reason(module: nn.Module, spec: QuantSpec) -> str | None:
    if module.padding_mode != "zeros" and isinstance(module.padding, str):
        return f"padding={module.padding!r} with padding_mode={module.padding_mode!r} is not supported"
    return _conv_branch_reason(module, spec) or spec.incompatibility(
        _conv_gemm_k(module), act_features=module.in_channels
    )


def _convt_reason(module: nn.Module, spec: QuantSpec) -> str | None:
    return _conv_branch_reason(module, spec) or spec.incompatibility(
        _conv_gemm_k(module), act_features=module.in_channels
    )


def _conv_builder(plain: type[QuantLayer], lowrank: type[QuantLayer]) -> Callable[[Any, QuantSpec], QuantLayer]:
    """A conv rule's builder: the low-rank twin (data-free split: λ = 1, rank-r SVD of the GEMM view) when the spec
    has a branch, the plain quantized conv otherwise."""

    def build(module: nn.Module, spec: QuantSpec) -> QuantLayer:
        return (lowrank if spec.rank > 0 else plain).from_float(module, spec)

    return build


def _branchable_conv(module: nn.Module) -> bool:
    """A conv that can take SVDQuant's branch and smoothing: ``groups == 1``, a plain float conv type or an adapted
    layer whose effective layer is one and which has no builder of its own (timm ``Conv2dSame``'s dynamic padding
    has no low-rank twin)."""
    adapter = adapter_for(module)
    if adapter is not None and adapter.build is not None:
        return False
    geometry = module if adapter is None else adapter.effective(module)
    return type(geometry) in FLOAT_LOWRANK_CONV_TWINS and geometry.groups == 1


def _gemm_geometry(module: nn.Module) -> tuple[int, int, int | None] | None:
    """``(N, K, act_features)`` of the layer's GEMM (``act_features`` ``None`` for a Linear, the input channels of a
    conv), from the plain float layer an adapted layer is quantized as; ``None`` for another layer type.

    A Linear/conv subclass has its effective layer's shapes already: only other adapted types (``MotionLinear``)
    are asked for their effective layer, so shape checks never recompute a standardised weight."""
    geometry = module if isinstance(module, (nn.Linear, *FLOAT_CONV_TYPES)) else effective_layer(module)
    if isinstance(geometry, nn.Linear):
        return geometry.out_features, geometry.in_features, None
    if isinstance(geometry, FLOAT_CONV_TYPES):
        k = _conv_gemm_k(geometry)
        return geometry.weight.numel() // k, k, geometry.in_channels
    return None


def _fitting_spec(
    module: nn.Module, spec: QuantSpec, reason: Callable[[Any, QuantSpec], str | None]
) -> tuple[QuantSpec, tuple[str, ...]] | None:
    """``spec`` with the group and format fallbacks (:meth:`QuantSpec.with_fallbacks`) the layer needs and one note
    per change, or ``None`` (the layer is then skipped)."""
    geometry = _gemm_geometry(module)
    if geometry is None:
        return None
    _, k, a = geometry
    fitted = spec.with_fallbacks(k, act_features=a)
    return fitted if fitted is not None and reason(module, fitted[0]) is None else None


def _block_note(module: nn.Module, spec: QuantSpec) -> str:
    """Why the group fallback cannot help when a block format's block does not divide its length ("" otherwise)."""
    geometry = _gemm_geometry(module)
    if geometry is None:
        return ""
    _, k, a = geometry
    blocks = set()
    for fmt_name, length in ((spec.weight, k), (spec.act, k if a is None else a)):
        block = None if fmt_name is None else get_format(fmt_name).block_size
        if block is not None and length % block != 0:
            blocks.add(f"{fmt_name} blocks of {block}")
    return f" ({' and '.join(sorted(blocks))} are fixed by the format: no group fallback)" if blocks else ""


#: the smallest low-rank branch a narrow Linear falls back to; below it the layer is quantized with rank 0. Measured
#: on the trained zoo model fmnist-vit (svdquant-int4, 32 calibration images, output SQNR on 64 held-out ones, mean
#: over 6 blocks): rank 4 is the smallest rank that gains >= 3 dB over rank 0 on every layer role (qkv +4.1, proj
#: +7.0, fc1 +3.1, fc2 +4.3 dB; rank 2: +1.9 to +3.7); on the 10-wide head ranks 1 and 2 gain 0.3 and 1.5 dB for a
#: 16-bit branch that costs 1.9 and 3.7 extra bits per weight, rank 4 gains 4.6 dB
MIN_FALLBACK_RANK = 4


def _useful_rank(rank: int, n: int, k: int) -> int:
    """The largest useful branch rank for a ``[N, K]`` weight: at most ``rank``, a power of two ``<= min(N, K) / 4``
    (so ``r·(N + K) <= N·K / 2``: the branch saves weights and leaves a residual to quantize), and 0 when that is
    below :data:`MIN_FALLBACK_RANK`."""
    r = 1 << ((min(n, k) // 4).bit_length() - 1) if min(n, k) >= 4 else 0
    r = min(rank, r)
    return r if r >= MIN_FALLBACK_RANK else 0


def _conv_rank_fallback(n: int, k: int, act: int | None, spec: QuantSpec) -> tuple[int, str] | None:
    """A conv's branch gets the useful rank of its GEMM view ``[N, K = C·prod(k)]`` (at most ``min(N, K) / 4``)."""
    if act is None:
        return None
    r = _useful_rank(spec.rank, n, k)
    return r, f"conv low-rank rank {r}" + (
        f" (rank {spec.rank} -> {r}: min(N, K) = {min(n, k)})" if r != spec.rank else ""
    )


def _narrow_rank_fallback(n: int, k: int, act: int | None, spec: QuantSpec) -> tuple[int, str] | None:
    if act is not None or spec.rank < min(n, k):
        return None
    r = _useful_rank(spec.rank, n, k)
    return r, f"rank {spec.rank} -> {r}: layer narrower than the rank (min(N, K) = {min(n, k)})"


#: rank fallbacks, tried in order while the spec has a low-rank branch: (N, K, act_features or None for a Linear,
#: spec) -> (the rank the layer gets, report note), or None when the rule does not apply
RANK_FALLBACKS: tuple[Callable[[int, int, int | None, QuantSpec], tuple[int, str] | None], ...] = (
    _conv_rank_fallback,
    _narrow_rank_fallback,
)


def _rank_fallback(module: nn.Module, spec: QuantSpec) -> tuple[QuantSpec, str | None]:
    """``spec`` with the rank the layer can take (:data:`RANK_FALLBACKS`) and the report note, or ``spec`` and
    ``None`` when it keeps its rank."""
    geometry = _gemm_geometry(module) if spec.rank > 0 else None
    if geometry is None:
        return spec, None
    if geometry[2] is not None and not _branchable_conv(module):
        g = getattr(effective_layer(module), "groups", 1)
        why = f"groups={g}" if g != 1 else f"{type(module).__name__} is built by its layer adapter"
        return spec.replace(rank=0), f"conv: no low-rank branch ({why}; rank 0)"
    for fallback in RANK_FALLBACKS:
        got = fallback(*geometry, spec)
        if got is not None:
            return spec.replace(rank=got[0]), got[1]
    return spec, None


#: float type -> (why it cannot take the spec, or None; builder of the quantized layer)
LAYER_RULES: dict[
    type[nn.Module], tuple[Callable[[Any, QuantSpec], str | None], Callable[[Any, QuantSpec], QuantLayer]]
] = {
    nn.Linear: (_linear_reason, _linear_rule),
    **{
        t: (
            _convt_reason if t in FLOAT_CONV_TRANSPOSE_TYPES else _conv_reason,
            _conv_builder(q, FLOAT_LOWRANK_CONV_TWINS[t]),
        )
        for t, q in CONV_TWINS.items()
    },
}


def register_layer_rule(
    float_type: type[nn.Module],
    reason: Callable[[Any, QuantSpec], str | None],
    build: Callable[[Any, QuantSpec], QuantLayer],
) -> None:
    """Teach ``quantize_model`` a new float layer type."""
    LAYER_RULES[float_type] = (reason, build)


def _adapted_rule(adapter: LayerAdapter, module: nn.Module) -> tuple[Any, str | None]:
    """The base type's rule applied to the adapter's effective float layer (its builder replaced when the adapter
    has one), or ``None`` and why this layer cannot be adapted."""
    why = adapter.reason(module) if adapter.reason is not None else None
    if why is not None:
        return None, why
    if adapter.base not in LAYER_RULES:
        return None, f"the layer adapter of {type(module).__name__} gives a {adapter.base.__name__}, which has no rule"
    reason, build = LAYER_RULES[adapter.base]
    build = adapter.build or build
    cache: dict[int, nn.Module] = {}

    def effective(m: nn.Module) -> nn.Module:  # computed once (weight standardisation is not free), then reused
        if id(m) not in cache:
            cache.clear()
            cache[id(m)] = adapter.effective(m)
        return cache[id(m)]

    return (lambda m, spec: reason(effective(m), spec), lambda m, spec: build(effective(m), spec)), None


def _rule_for(module: nn.Module) -> tuple[Any, str | None]:
    """The rule for ``module`` and ``None``, or ``None`` and why it is unsupported."""
    adapter = adapter_for(module)
    if adapter is not None:
        return _adapted_rule(adapter, module)
    for base, rule in LAYER_RULES.items():
        if type(module) is base:
            return rule, None
    for base, rule in LAYER_RULES.items():
        if isinstance(module, base):
            if type(module).forward is not base.forward:
                return None, f"{type(module).__name__} subclasses {base.__name__} {OVERRIDES_FORWARD}"
            return rule, None
    return None, f"unsupported layer type {type(module).__name__}"


def _is_weight_layer(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.ndim >= 2 and not any(True for _ in module.children())


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def module_references(model: nn.Module) -> dict[int, list[str]]:
    """``id(module)`` -> every name it is registered under (a layer reused in several places has several)."""
    refs: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name:
            refs.setdefault(id(m), []).append(name)
    return refs


def replace_module(model: nn.Module, refs: dict[int, list[str]], old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered (``refs`` from :func:`module_references`)."""
    for name in refs[id(old)]:
        _set_submodule(model, name, new)


def layer_spec(
    module: nn.Module,
    spec: QuantSpec,
    reason: Callable[[Any, QuantSpec], str | None],
    *,
    rank_fallback: bool = True,
    group_fallback: bool = True,
    name: str = "",
) -> tuple[QuantSpec, str | None, list[str]]:
    """The spec ``module`` is quantized with after the rank and group fallbacks: ``(spec, why skipped or None,
    fallback notes)``. One function for ``quantize_model`` and the meta-device ``quantized_structure``."""
    notes: list[str] = []
    if rank_fallback:
        spec, note = _rank_fallback(module, spec)
        if note is not None:
            notes.append(note)
    why = reason(module, spec)
    if why is not None and group_fallback:
        fitted = _fitting_spec(module, spec, reason)
        if fitted is not None:
            logger.info("%s: %s; using %s", name or type(module).__name__, why, fitted[0].short())
            notes.append(f"group fallback ({why})" + (": " + ", ".join(fitted[1]) if fitted[1] else ""))
            spec, why = fitted[0], None
    if why is not None and group_fallback:
        why += _block_note(module, spec)
    return spec, why, notes


def quantize_model(
    model: nn.Module,
    config: str | QuantConfig | QuantSpec | dict = "w8a8",
    calib_data: CalibData | None = None,
    *,
    include: list[str] | tuple[str, ...] | None = None,
    exclude: list[str] | tuple[str, ...] | None = None,
    freeze: bool = True,
    group_fallback: bool = True,
    rank_fallback: bool = True,
) -> nn.Module:
    """Quantize ``model`` in place and return the same object.

    Args:
        model: any ``nn.Module`` (a timm or torchvision model, a diffusers denoiser, ...).
        config: a preset name (see :func:`vqsuite.list_presets`), a :class:`QuantConfig`, a single
            :class:`QuantSpec` applied everywhere, or a config dict.
        calib_data: batches for static activation ranges (``act_mode="static"`` specs) and for SVDQuant
            (``method="svdquant"``: smoothing search, low-rank refinement, optional GPTQ, from one pass that
            captures a bounded sample of every low-rank layer's input); a tensor, an iterable of
            tensors/tuples/dicts, or a callable ``fn(model)`` (a whole diffusion pipeline run, say).
            ``method="svdquant"`` without it falls back to a data-free branch (λ = 1, SVD of W) with a warning.
            ``method="gptq"`` needs it (every layer's codes come from the Hessian of its inputs; a ConfigError
            otherwise).
        include: if given, only layers whose name matches one of these fnmatch patterns are quantized.
        exclude: extra fnmatch patterns to leave in float (added to the config's).
        freeze: pack weights into low-bit storage now (memory drops). ``False`` keeps the fake-quant state
            for calibration or fine-tuning; call :func:`vqsuite.freeze` later.
        group_fallback: a layer whose reduction length the recipe's integer group (e.g. INT4 g64) does not divide
            gets the largest halved group that does (down to 16; K = 288 -> g32) instead of staying 16-bit; when
            none does (depthwise K = 9, RGB stems K = 27 or 147), weights get per-channel scales and activations
            per-token ones, and a 4-bit weight on an odd K its 8-bit format (:meth:`QuantSpec.with_fallbacks`).
            The report says so. Block formats (NVFP4, MXFP4) keep their block and skip such layers.
        rank_fallback: under a recipe with a low-rank branch, a conv gets the largest useful rank of its GEMM view
            ``[N, K = C·prod(k)]`` (a power of two ``<= min(N, K) / 4``, at most the recipe's; report note "conv
            low-rank rank r"), a grouped conv rank 0, and a Linear narrower than the rank (``rank >= min(N, K)``)
            the largest useful rank, or rank 0 below :data:`MIN_FALLBACK_RANK` (SVDQuant still searches the
            smoothing of rank-0 layers and runs GPTQ when the recipe does); the report says so. ``False`` skips
            the layers that cannot take the recipe's rank.

    The per-layer report is ``model.vqsuite_report`` (:class:`QuantReport`): what was quantized with which
    spec, what was skipped and why. Quantizing nothing, or under half of the matrix weights, warns loudly.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include = (include,) if isinstance(include, str) else include  # one pattern, not its characters
    exclude = (exclude,) if isinstance(exclude, str) else exclude
    cfg = resolve_config(config)
    if exclude:
        cfg = cfg.with_overrides(exclude=tuple(cfg.exclude) + tuple(exclude))
    if cfg.method == "qat":
        raise ConfigError("method='qat' describes a frozen QAT model (vqsuite.finetune.freeze_qat), not a recipe")
    if cfg.method == "vit-ptq":  # RepQ LayerNorm folding and ViT activation quantizers go in on the float model
        from vqsuite.calibrators.vit_ptq import prepare_vit_ptq

        prepare_vit_ptq(model, cfg.options, calib_data)
    report = QuantReport(total_weight_numel=matrix_weight_numel(model), bytes_before=module_nbytes(model))
    targets: list[tuple[str, nn.Module, QuantSpec, Any]] = []
    fallback_notes: dict[str, str] = {}
    rank0_layers: set[str] = set()  # Linears and convs whose rank fell back to 0: SVDQuant still calibrates them
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            report.layers.append(LayerEntry(name, type(module).__name__, "skipped", "already quantized"))
            continue
        if not _is_weight_layer(module):
            continue
        if not name:
            report.layers.append(
                LayerEntry(
                    "<root>",
                    type(module).__name__,
                    "skipped",
                    "the root module cannot be swapped in place; wrap it in a container",
                )
            )
            continue
        numel = module.weight.numel()
        tname = type(module).__name__
        rule, why = _rule_for(module)
        if rule is not None and numel == 0:  # Linear(K, 0) and the like: a valid layer with nothing to quantize
            rule, why = None, f"empty weight {tuple(module.weight.shape)}: nothing to quantize"
        if rule is None:
            report.layers.append(LayerEntry(name, tname, "skipped", why, weight_numel=numel))
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            report.layers.append(LayerEntry(name, tname, "skipped", "not matched by include", weight_numel=numel))
            continue
        spec, origin = cfg.resolve(name)
        if spec is None:
            report.layers.append(LayerEntry(name, tname, "skipped", origin, weight_numel=numel))
            continue
        recipe_rank = spec.rank
        spec, why, notes = layer_spec(
            module, spec, rule[0], rank_fallback=rank_fallback, group_fallback=group_fallback, name=name
        )
        if recipe_rank > 0 and spec.rank == 0 and _svdquant_kind(module) is not None:
            rank0_layers.add(name)
        if notes and why is None:
            fallback_notes[name] = "; ".join(notes)
        if why is not None:
            report.layers.append(LayerEntry(name, tname, "skipped", why, weight_numel=numel))
            continue
        targets.append((name, module, spec, rule))

    static_names = [name for name, _, spec, _ in targets if spec.act_mode == "static"]
    if static_names and calib_data is None:  # refuse before touching the model
        raise UserError(
            f"{len(static_names)} layer(s) use static activation scales (e.g. {static_names[0]!r}); pass calib_data"
        )

    swapped: dict[str, QuantLayer] = {}
    refs = module_references(model)
    try:
        # SVDQuant calibrates on the float model, before any layer is swapped
        prebuilt = _svdquant_layers(model, targets, cfg, calib_data, rank0_layers) if cfg.method == "svdquant" else {}
        gptq_codes = _gptq_codes(model, targets, cfg, calib_data) if cfg.method == "gptq" else {}
        with torch.no_grad():
            for name, module, spec, rule in targets:
                q, how = prebuilt.get(name, (None, ""))
                if q is None:
                    q = rule[1](module, spec)
                if name in gptq_codes:  # adopt the codes GPTQ chose (freeze stores exactly them)
                    q.set_pending_qtensor(gptq_codes[name][0])
                    how = gptq_codes[name][1]
                q.layer_name = name
                accept_extra_args(q, adapter_for(module))  # callers keep passing the adapted class's extra args
                replace_module(model, refs, module, q)  # a reused layer is swapped everywhere it is used
                swapped[name] = q
                if name in fallback_notes:
                    how = f"{how}; {fallback_notes[name]}" if how else fallback_notes[name]
                adapter = adapter_for(module)
                if adapter is not None:
                    how = f"{how}; layer adapter: {adapter.note}" if how else f"layer adapter: {adapter.note}"
                report.layers.append(
                    LayerEntry(name, type(module).__name__, "quantized", how, spec.short(), module.weight.numel())
                )

        searched = [q for q in swapped.values() if q.spec.weight_range != "minmax" and q.pending_qtensor() is None]
        for q in searched:  # clipping ranges by L_p search; the codes are adopted as GPTQ's are
            w = q._to_gemm(q.__dict__["_parameters"]["weight"])
            q.set_pending_qtensor(search_weight_qtensor(w, q.spec, q.spec.weight_range, name=f"{q.layer_name}.weight"))
        static = {n: q for n, q in swapped.items() if q.spec.act_mode == "static"}
        if static:
            if any(q.spec.act_granularity != "pooled" for q in static.values()) and step_tracker_of(model) is None:
                # per-step scales need the step at calibration and inference; a bare model publishes its timestep
                attach_step_tracker(model)
            calibrate_static_scales(model, static, calib_data)
        if cfg.method == "vit-ptq":
            from vqsuite.calibrators.vit_ptq import calibrate_vit_ptq

            calibrate_vit_ptq(model, calib_data)
        elif not static and calib_data is not None and not gptq_codes and all(q is None for q, _ in prebuilt.values()):
            logger.info("calib_data given but no layer needs static calibration or SVDQuant; it was not used")
    except BaseException:
        # a failed call (bad calibration data, say) leaves the model as it was, not half quantized
        for name, module, _, _ in targets:
            if name in swapped:
                replace_module(model, refs, module, module)
        raise

    if freeze:
        for q in swapped.values():
            q.freeze()
    report.layers.sort(key=lambda e: e.name)
    report.bytes_after = module_nbytes(model)
    model.vqsuite_report = report
    model.vqsuite_config = cfg
    _log_report(report)
    return model


def _progress(items: list, desc: str):
    """``tqdm`` over ``items`` when tqdm is installed, the list itself otherwise."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="group", leave=False, disable=len(items) <= 1)


def _svdquant_layers(
    model: nn.Module,
    targets: list[tuple[str, nn.Module, QuantSpec, Any]],
    cfg: QuantConfig,
    calib_data: CalibData,
    rank0: set[str] | frozenset[str] = frozenset(),
) -> dict[str, tuple[QuantLayer | None, str]]:
    """SVDQuant for the Linear and (``groups == 1``) conv targets with ``rank > 0``, and with calibration data also
    for the layers named in ``rank0`` (narrow layers whose rank fell back to 0: smoothing search and GPTQ without a
    branch): name -> (calibrated layer or ``None``, report note). A conv is captured as its GEMM rows (im2col rows,
    a transposed conv's input pixels; :func:`~vqsuite.calibrators.svdquant.conv_capture_transform`) and calibrated
    on its own.

    One pass over ``calib_data`` captures each layer's :class:`InputStats` and which layers receive the identical
    input tensor; such layers form a shared-input group (one λ, one shared ``proj_down``) when they also share a
    spec, so a group's members always have one rank. A ``None`` layer means the ordinary rule builds it (the
    data-free low-rank init: λ = 1, SVD of W).
    """
    from vqsuite.calibrators.shared_inputs import track_shared_inputs
    from vqsuite.calibrators.svdquant import SVDQuantOptions, conv_capture_transform, svdquant_group

    opts = SVDQuantOptions.from_dict(cfg.options)
    lowrank = {
        name: (module, spec)
        for name, module, spec, _ in targets
        if _svdquant_kind(module) is not None and (spec.rank > 0 or (name in rank0 and calib_data is not None))
    }
    if not lowrank:
        return {}
    data_free = "svdquant data-free: lambda=1, rank-r SVD of W (no calibration data)"
    if calib_data is None:
        logger.warning(
            "method='svdquant' without calib_data: %d layer(s) get a data-free low-rank branch (lambda = 1, rank-r "
            "SVD of W: no smoothing search, no refinement, no GPTQ); pass calib_data for SVDQuant proper",
            len(lowrank),
        )
        return {name: (None, data_free) for name in lowrank}
    modules = {name: module for name, (module, _) in lowrank.items()}
    # a conv is captured as its GEMM rows (im2col rows; a transposed conv's input pixels) and calibrated alone
    convs = {name: effective_layer(m) for name, m in modules.items() if _svdquant_kind(m) == "conv"}
    linears = {name: m for name, m in modules.items() if name not in convs}
    with (
        capture_inputs(
            modules,
            reservoir=opts.reservoir,
            track_gram=opts.gptq and opts.gptq_gram,
            transform=conv_capture_transform(convs) if convs else None,
        ) as stats,
        track_shared_inputs(linears) as tracker,
    ):
        run_calibration_data(model, calib_data)
    out: dict[str, tuple[QuantLayer | None, str]] = {}
    missing = [name for name in lowrank if name not in stats and lowrank[name][1].rank > 0]
    if missing:
        logger.warning(
            "calibration data never reached %d low-rank layer(s) (e.g. %r); they get the data-free init",
            len(missing),
            missing[0],
        )
        out.update({name: (None, data_free) for name in missing})
    missing_rank0 = [name for name in lowrank if name not in stats and lowrank[name][1].rank == 0]
    if missing_rank0:  # no branch to initialise: the ordinary rule quantizes them (RTN)
        logger.warning(
            "calibration data never reached %d rank-0 layer(s) (e.g. %r); they get plain round-to-nearest",
            len(missing_rank0),
            missing_rank0[0],
        )
    groups: list[list[str]] = [[name] for name in convs if name in stats]
    for group in tracker.groups([name for name in linears if name in stats]):
        # only layers with the same recipe, dtype and device can share λ and a proj_down Parameter
        by_kind: dict[tuple, list[str]] = {}
        for name in group:
            module, spec = lowrank[name]
            by_kind.setdefault((spec, module.weight.dtype, module.weight.device), []).append(name)
        groups.extend(by_kind.values())
    n_shared = sum(len(g) for g in groups if len(g) > 1)
    logger.info("svdquant: %d layer(s) in %d group(s), %d in shared-input groups", len(stats), len(groups), n_shared)
    for group in _progress(groups, "svdquant"):
        # hooks saw the model's own layers; the weights are their adapters' effective ones (same outputs)
        floats = [effective_layer(lowrank[n][0]) for n in group]
        layers = svdquant_group(floats, stats[group[0]], lowrank[group[0]][1], opts)
        for name, q in zip(group, layers, strict=True):
            note = q.svdquant_info["summary"] if name not in convs else "conv " + q.svdquant_info["summary"]
            if len(group) > 1:
                note += "; shares lambda and proj_down with " + ", ".join(n for n in group if n != name)
            out[name] = (q, note)
    return out


def _gptq_codes(
    model: nn.Module, targets: list[tuple[str, nn.Module, QuantSpec, Any]], cfg: QuantConfig, calib_data: CalibData
) -> dict[str, tuple[Any, str]]:
    """``method="gptq"``: name -> (GPTQ's QTensor, report note), from the float model (see
    :mod:`vqsuite.calibrators.gptq_model`); adapted layers are quantized as their effective float layer."""
    from vqsuite.calibrators.gptq_model import GPTQTarget, gptq_model_codes

    gptq_targets = [GPTQTarget(name, module, effective_layer(module), spec) for name, module, spec, _ in targets]
    return gptq_model_codes(model, gptq_targets, cfg.options, calib_data)


def _svdquant_kind(module: nn.Module) -> str | None:
    """``"linear"`` for a Linear (or a layer whose adapter makes it one), ``"conv"`` for a conv that can take the
    branch (:func:`_branchable_conv`), ``None`` otherwise: the layers SVDQuant calibrates."""
    adapter = adapter_for(module)
    if isinstance(module, nn.Linear) if adapter is None else issubclass(adapter.base, nn.Linear):
        return "linear"
    if isinstance(module, FLOAT_CONV_TYPES) or (adapter is not None and issubclass(adapter.base, FLOAT_CONV_TYPES)):
        return "conv" if _branchable_conv(module) else None
    return None


def _log_report(report: QuantReport) -> None:
    unadapted = report.unadapted_classes
    for e in report.skipped:
        if e.type not in unadapted:
            logger.info("skipped %s (%s): %s", e.name, e.type, e.reason)
    for cls_name, entries in unadapted.items():  # one line per class, not per layer
        logger.info(
            "skipped %d layer(s) of class %s (e.g. %s): %s; teach vqsuite its math with register_layer_adapter",
            len(entries),
            cls_name,
            entries[0].name,
            entries[0].reason,
        )
    logger.info("%s", report.summary())
    if not report.quantized:
        reasons = skip_reasons(report, limit=5)
        msg = "quantize_model quantized NOTHING: the model is unchanged. " + (
            f"Reasons: {'; '.join(reasons)}" if reasons else "It has no Linear, ConvNd or ConvTransposeNd layers."
        )
        logger.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    elif report.quantized_fraction < LOW_COVERAGE_WARN_FRACTION:
        top = sorted(report.skipped, key=lambda e: -e.weight_numel)[:3]
        msg = (
            f"quantize_model quantized only {100 * report.quantized_fraction:.1f}% of the matrix weights; "
            "largest skipped: " + "; ".join(f"{e.name} ({e.reason})" for e in top)
        )
        logger.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """Freeze every quantized layer of ``model`` (pack weights, drop float masters); returns ``model``. A QAT model
    (:func:`vqsuite.finetune.ofq`) is frozen by :func:`vqsuite.finetune.freeze_qat` first."""
    if isinstance(getattr(model, "vqsuite_qat", None), dict):
        from vqsuite.finetune.freeze import freeze_qat, is_qat_model

        if is_qat_model(model):
            freeze_qat(model)
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.freeze()
    if hasattr(model, "vqsuite_report"):
        model.vqsuite_report.bytes_after = module_nbytes(model)
    return model
