"""``quantize_model``: swap every supported layer of any ``nn.Module`` for its quantized twin.

Which float module becomes which quantized one is a small registry (``LAYER_RULES``); a layer is skipped, with
the reason in the report and a log line, when its type is unsupported, a subclass changes ``forward``, the
config excludes it, or its shape does not fit the spec (e.g. a group that does not divide K).
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vqsuite.calibrators import collect_input_amax
from vqsuite.calibrators.data import CalibData
from vqsuite.config import QuantConfig, QuantSpec, resolve_config
from vqsuite.nn import QConv2d, QConvTranspose2d, QLinear, QLinearLowRank, QuantLayer
from vqsuite.nn.quantizers import static_scale_from_amax
from vqsuite.pipelines.report import LayerEntry, QuantReport, matrix_weight_numel, module_nbytes

logger = logging.getLogger(__name__)

#: quantized fraction of matrix weights under which quantize_model warns that little was quantized
LOW_COVERAGE_WARN_FRACTION = 0.5


def _linear_rule(module: nn.Linear, spec: QuantSpec) -> QuantLayer:
    return (QLinearLowRank if spec.rank > 0 else QLinear).from_float(module, spec)


def _conv_reason(module: nn.Conv2d, spec: QuantSpec) -> str | None:
    if module.padding_mode != "zeros" and isinstance(module.padding, str):
        return f"padding={module.padding!r} with padding_mode={module.padding_mode!r} is not supported"
    k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return spec.incompatibility(k, act_features=module.in_channels)


def _convt_reason(module: nn.ConvTranspose2d, spec: QuantSpec) -> str | None:
    return spec.incompatibility(module.in_channels // module.groups, act_features=module.in_channels)


#: float type -> (why it cannot take the spec, or None; builder of the quantized layer)
LAYER_RULES: dict[
    type[nn.Module], tuple[Callable[[Any, QuantSpec], str | None], Callable[[Any, QuantSpec], QuantLayer]]
] = {
    nn.Linear: (lambda m, s: s.incompatibility(m.in_features), _linear_rule),
    nn.Conv2d: (_conv_reason, QConv2d.from_float),
    nn.ConvTranspose2d: (_convt_reason, QConvTranspose2d.from_float),
}


def register_layer_rule(
    float_type: type[nn.Module],
    reason: Callable[[Any, QuantSpec], str | None],
    build: Callable[[Any, QuantSpec], QuantLayer],
) -> None:
    """Teach ``quantize_model`` a new float layer type."""
    LAYER_RULES[float_type] = (reason, build)


def _rule_for(module: nn.Module) -> tuple[Any, str | None]:
    """The rule for ``module`` and ``None``, or ``None`` and why it is unsupported."""
    for base, rule in LAYER_RULES.items():
        if type(module) is base:
            return rule, None
    for base, rule in LAYER_RULES.items():
        if isinstance(module, base):
            if type(module).forward is not base.forward:
                return None, f"{type(module).__name__} subclasses {base.__name__} but overrides forward"
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


def quantize_model(
    model: nn.Module,
    config: str | QuantConfig | QuantSpec | dict = "w8a8",
    calib_data: CalibData | None = None,
    *,
    include: list[str] | tuple[str, ...] | None = None,
    exclude: list[str] | tuple[str, ...] | None = None,
    freeze: bool = True,
) -> nn.Module:
    """Quantize ``model`` in place and return the same object.

    Args:
        model: any ``nn.Module`` (a timm or torchvision model, a diffusers denoiser, ...).
        config: a preset name (see :func:`vqsuite.list_presets`), a :class:`QuantConfig`, a single
            :class:`QuantSpec` applied everywhere, or a config dict.
        calib_data: batches for static activation ranges (needed only by ``act_mode="static"`` specs); a tensor,
            an iterable of tensors/tuples/dicts, or a callable ``fn(model)``.
        include: if given, only layers whose name matches one of these fnmatch patterns are quantized.
        exclude: extra fnmatch patterns to leave in float (added to the config's).
        freeze: pack weights into low-bit storage now (memory drops). ``False`` keeps the fake-quant state
            for calibration or fine-tuning; call :func:`vqsuite.freeze` later.

    The per-layer report is ``model.vqsuite_report`` (:class:`QuantReport`): what was quantized with which
    spec, what was skipped and why. Quantizing nothing, or under half of the matrix weights, warns loudly.
    """
    cfg = resolve_config(config)
    if exclude:
        cfg = cfg.with_overrides(exclude=tuple(cfg.exclude) + tuple(exclude))
    report = QuantReport(total_weight_numel=matrix_weight_numel(model), bytes_before=module_nbytes(model))
    targets: list[tuple[str, nn.Module, QuantSpec, Any]] = []
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
        why = rule[0](module, spec)
        if why is not None:
            report.layers.append(LayerEntry(name, tname, "skipped", why, weight_numel=numel))
            continue
        targets.append((name, module, spec, rule))

    static_names = [name for name, _, spec, _ in targets if spec.act_mode == "static"]
    if static_names and calib_data is None:  # refuse before touching the model
        raise ValueError(
            f"{len(static_names)} layer(s) use static activation scales (e.g. {static_names[0]!r}); pass calib_data"
        )

    swapped: dict[str, QuantLayer] = {}
    refs = module_references(model)
    try:
        with torch.no_grad():
            for name, module, spec, rule in targets:
                q = rule[1](module, spec)
                q.layer_name = name
                replace_module(model, refs, module, q)  # a reused layer is swapped everywhere it is used
                swapped[name] = q
                report.layers.append(
                    LayerEntry(name, type(module).__name__, "quantized", "", spec.short(), module.weight.numel())
                )

        static = {n: q for n, q in swapped.items() if q.spec.act_mode == "static"}
        if static:
            amax = collect_input_amax(model, static, calib_data)
            for n, q in static.items():
                q.act_scale.copy_(static_scale_from_amax(amax[n], q.spec.act).to(q.act_scale.device))
        elif calib_data is not None:
            logger.info("calib_data given but no layer needs static calibration; it was not used")
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


def _log_report(report: QuantReport) -> None:
    for e in report.skipped:
        logger.info("skipped %s (%s): %s", e.name, e.type, e.reason)
    logger.info("%s", report.summary())
    if not report.quantized:
        reasons = sorted({e.reason for e in report.skipped})[:5]
        msg = "quantize_model quantized NOTHING: the model is unchanged. " + (
            f"Reasons: {'; '.join(reasons)}" if reasons else "It has no Linear/Conv2d/ConvTranspose2d layers."
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
    """Freeze every quantized layer of ``model`` (pack weights, drop float masters); returns ``model``."""
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.freeze()
    if hasattr(model, "vqsuite_report"):
        model.vqsuite_report.bytes_after = module_nbytes(model)
    return model
