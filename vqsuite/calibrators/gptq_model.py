"""GPTQ for a whole model (``QuantConfig(method="gptq")``, presets ``w8a8-gptq``, ``w4a16-gptq``, ...).

Every quantized Linear, ConvNd and ConvTransposeNd gets GPTQ-chosen codes
(:func:`vqsuite.calibrators.gptq.gptq_layer`) from the Hessian of its own GEMM rows (im2col rows for convs),
streamed over the calibration data.

Two orders (``method_options``' ``sequential``):

* one pass (``False``, the default): every Hessian comes from one forward of the float model; cheap.
* sequential (``True``): layers are quantized in the order the model first calls them; layer ``i``'s Hessian comes
  from a forward in which layers ``0..i-1`` already hold their GPTQ weights (float activations), so each layer
  also compensates the error its inputs carry (the GPTQ paper's order). One forward per layer, cut short once the
  layer has seen its input when ``calib_data`` is a tensor or a list of batches (a callable ``calib_data``, such
  as ``quantize_pipeline``'s sampling runs, is run whole for every layer). On MobileNetV2 (53 layers) that is
  about 27 full forwards instead of one, and on the test CNN (``tests/pipelines/test_quantize_gptq.py``) it measured
  no better than one pass (37.3 vs 37.4 dB output SQNR at w4a16), so it is opt-in.

Options (``method_options``): ``damp`` (0.01 of the mean Hessian diagonal), ``block_size`` (128), ``scale_mode``
(``"dynamic"``: group scales from the updated weights as the sweep enters them; ``"static"``: scales of the
unmodified weight and act order, see :mod:`vqsuite.calibrators.gptq`), ``sequential``.

The result is plain state: ``{layer name: QTensor}`` in each quantized layer's GEMM layout; ``quantize_model``
adopts them with ``QuantLayer.set_pending_qtensor`` (static activation scales are calibrated afterwards, on the
GPTQ weights) and ``freeze`` stores exactly those codes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from vqsuite.calibrators.data import CalibData, run_calibration_data
from vqsuite.calibrators.gptq import (
    DEFAULT_BLOCK,
    DEFAULT_DAMP,
    GPTQ_LAYER_TYPES,
    StreamingHessian,
    gptq_layer,
    weight_from_gemm,
)
from vqsuite.config import QuantSpec
from vqsuite.errors import ConfigError
from vqsuite.formats import QTensor, dequantize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQOptions:
    """Knobs of ``method="gptq"`` (``QuantConfig.method_options``); see the module docstring."""

    damp: float = DEFAULT_DAMP
    block_size: int = DEFAULT_BLOCK
    scale_mode: str = "dynamic"
    sequential: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not self.damp >= 0:
            raise ConfigError(f"gptq damp={self.damp!r} must be a number >= 0")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ConfigError(f"gptq block_size={self.block_size!r} must be an integer >= 1")
        if self.scale_mode not in ("dynamic", "static"):
            raise ConfigError(f"gptq scale_mode={self.scale_mode!r} must be 'dynamic' or 'static'")
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"gptq sequential={self.sequential!r} must be True or False")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTQOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown gptq option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


class _Reached(Exception):
    """Raised by a hook to cut a calibration forward short once the layer it waits for has seen its input."""


@dataclass
class GPTQTarget:
    """One layer to GPTQ: its name, the model's own module (hooked), the plain float layer it is quantized as
    (an adapter's effective layer; the module itself otherwise) and its spec."""

    name: str
    module: nn.Module
    layer: nn.Module
    spec: QuantSpec


def _hook(target: GPTQTarget, acc: StreamingHessian, stop: bool) -> Callable:
    def hook(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        acc.add(x, shape)
        if stop:
            raise _Reached

    return hook


def _run(model: nn.Module, calib_data: CalibData, early_stop: bool) -> None:
    """Run the calibration data; with ``early_stop``, batch by batch, each cut short by :class:`_Reached`."""
    if not early_stop:
        run_calibration_data(model, calib_data)
        return
    batches = [calib_data] if isinstance(calib_data, torch.Tensor) else calib_data
    for batch in batches:
        try:
            run_calibration_data(model, [batch])
        except _Reached:
            pass


def _can_cut_short(calib_data: CalibData) -> bool:
    """A tensor or a list/tuple of batches can be run batch by batch (a callable or a one-shot iterator cannot)."""
    return isinstance(calib_data, (torch.Tensor, list, tuple))


def _capture(model: nn.Module, targets: list[GPTQTarget], calib_data: CalibData, stop: bool) -> dict[str, Any]:
    accs = {t.name: StreamingHessian(t.layer) for t in targets}
    handles = [t.module.register_forward_hook(_hook(t, accs[t.name], stop), with_kwargs=True) for t in targets]
    try:
        _run(model, calib_data, stop)
    finally:
        for h in handles:
            h.remove()
    return accs


def _call_order(model: nn.Module, targets: list[GPTQTarget], calib_data: CalibData) -> list[GPTQTarget]:
    """``targets`` in the order the model first calls them (never-called ones last)."""
    first: dict[str, int] = {}

    def make(name: str) -> Callable:
        def hook(*_: Any) -> None:
            first.setdefault(name, len(first))

        return hook

    handles = [t.module.register_forward_pre_hook(make(t.name)) for t in targets]
    try:
        if _can_cut_short(calib_data):  # one batch tells the order
            run_calibration_data(model, [calib_data if isinstance(calib_data, torch.Tensor) else calib_data[0]])
        else:
            run_calibration_data(model, calib_data)
    finally:
        for h in handles:
            h.remove()
    return sorted(targets, key=lambda t: first.get(t.name, len(first)))


def _substitutable(t: GPTQTarget) -> bool:
    """Whether the model's module computes with its ``weight`` as is (so it can hold the GPTQ weight for the
    later layers' inputs): true unless an adapter transforms the weight (weight standardisation)."""
    return (
        t.layer is t.module
        or t.layer.weight.shape == t.module.weight.shape
        and torch.equal(t.layer.weight, t.module.weight)
    )


def _dequantized_weight(t: GPTQTarget, qt: QTensor) -> torch.Tensor:
    """The GPTQ weight in the float module's own shape and dtype."""
    w = weight_from_gemm(t.layer, dequantize(qt, torch.float32))
    return w.to(dtype=t.module.weight.dtype, device=t.module.weight.device)


@torch.no_grad()
def gptq_model_codes(
    model: nn.Module, targets: list[GPTQTarget], options: dict[str, Any], calib_data: CalibData | None
) -> dict[str, tuple[QTensor, str]]:
    """GPTQ codes for ``targets`` (the layers ``quantize_model`` is about to swap): name -> (QTensor in the quantized
    layer's GEMM layout, report note). Layers the calibration data never reaches are left out (round-to-nearest,
    with a warning). The model is unchanged on return."""
    opts = GPTQOptions.from_dict(options)
    targets = [t for t in targets if t.spec.weight is not None and isinstance(t.layer, GPTQ_LAYER_TYPES)]
    if not targets:
        return {}
    if calib_data is None:
        raise ConfigError(
            f"method='gptq' needs calib_data: {len(targets)} layer(s) (e.g. {targets[0].name!r}) get their codes "
            "from the Hessian of their calibration inputs"
        )
    kw = {"damp": opts.damp, "block_size": opts.block_size, "scale_mode": opts.scale_mode}
    out: dict[str, tuple[QTensor, str]] = {}
    missing: list[str] = []
    t0 = time.perf_counter()
    sequential = opts.sequential
    mode = "sequential" if sequential else "one pass"
    note = f"gptq ({mode}, damp {opts.damp:g}, {opts.scale_mode} scales)"
    if not sequential:
        accs = _capture(model, targets, calib_data, stop=False)
        for t in targets:
            if accs[t.name].rows == 0:
                missing.append(t.name)
                continue
            out[t.name] = (gptq_layer(t.layer, accs[t.name].hessian(), t.spec, **kw), note)
    else:
        ordered = _call_order(model, targets, calib_data)
        cut = _can_cut_short(calib_data)
        saved: dict[str, torch.Tensor] = {}
        try:
            for t in ordered:
                acc = _capture(model, [t], calib_data, stop=cut)[t.name]
                if acc.rows == 0:
                    missing.append(t.name)
                    continue
                qt = gptq_layer(t.layer, acc.hessian(), t.spec, **kw)
                out[t.name] = (qt, note)
                if _substitutable(t):  # later layers see this layer's GPTQ weight
                    saved[t.name] = t.module.weight.detach().clone()
                    t.module.weight.copy_(_dequantized_weight(t, qt))
                else:
                    logger.debug("%s: an adapter transforms its weight; later layers see its float weight", t.name)
        finally:
            by_name = {t.name: t for t in targets}
            for name, w in saved.items():
                by_name[name].module.weight.copy_(w)
    if missing:
        logger.warning(
            "gptq: calibration data never reached %d layer(s) (e.g. %r); they get plain round-to-nearest",
            len(missing),
            missing[0],
        )
    logger.info("gptq (%s): %d layer(s) in %.1fs", mode, len(out), time.perf_counter() - t0)
    return out
