"""``quantize_pipeline``: quantize a loaded diffusers pipeline in place, calibrating by running the pipeline.

The denoiser (``pipe.transformer`` or ``pipe.unet``) is quantized with the recipe shaped by its architecture rule
(:mod:`vqsuite.pipelines.rules`); calibration, when the recipe needs data (SVDQuant, static activation scales), is a
callable handed to :func:`vqsuite.quantize_model` that runs the pipeline itself over prompts (text-to-image), class
labels (DiT) or nothing (unconditional DDPM), so every layer sees real inputs at every timestep and CFG branch.
Text encoders are left alone unless ``components`` names them (weight-only by default).

diffusers is never imported here: the pipeline object is duck-typed (``components``, ``__call__``).
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from torch import nn

from vqsuite.config import QuantConfig, QuantSpec, resolve_config
from vqsuite.errors import UserError
from vqsuite.nn import QuantLayer
from vqsuite.pipelines.io import _is_diffusion_pipeline
from vqsuite.pipelines.modules import quantize_model
from vqsuite.pipelines.report import QuantReport, module_nbytes, skip_reasons
from vqsuite.pipelines.rules import (
    ArchRule,
    LayerRule,
    denoiser_config,
    layer_role,
    rule_for,
    weight_only_config,
)

logger = logging.getLogger(__name__)

#: attribute names a pipeline's denoiser goes by, in the order they are looked for
DENOISER_NAMES: tuple[str, ...] = ("transformer", "unet", "prior", "decoder")
#: prompts used when ``calib_prompts`` is not given (shipped in the package)
DEFAULT_NUM_CALIB_PROMPTS = 16
#: steps of each calibration run when neither the caller nor the rule says
DEFAULT_CALIB_STEPS = 20


def default_calib_prompts() -> list[str]:
    """The calibration prompts shipped with vqsuite (``vqsuite/data/calib_prompts.txt``)."""
    text = resources.files("vqsuite").joinpath("data/calib_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def is_diffusion_pipeline(obj: Any) -> bool:
    """True for a diffusers ``DiffusionPipeline`` (checked by class name, without importing diffusers)."""
    return _is_diffusion_pipeline(obj)


def find_denoiser(pipe: Any, name: str | None = None) -> tuple[str, nn.Module]:
    """``(attribute name, module)`` of the pipeline's denoiser."""
    comps = getattr(pipe, "components", None) or {}
    if name is not None:
        if not isinstance(comps.get(name), nn.Module):
            raise UserError(f"denoiser={name!r} is not a module of {type(pipe).__name__} ({', '.join(comps)})")
        return name, comps[name]
    for cand in DENOISER_NAMES:
        if isinstance(comps.get(cand), nn.Module):
            return cand, comps[cand]
    raise UserError(
        f"cannot find the denoiser of {type(pipe).__name__}: none of {', '.join(DENOISER_NAMES)} is a module; "
        "pass denoiser='<component name>'"
    )


# ------------------------------------------------------------------------------ report
@dataclass
class LayerRow:
    """One weight layer of a quantized component, for the pipeline report."""

    component: str
    name: str
    type: str
    status: str  # "quantized" | "kept"
    format: str  # "W4A4", "W4A16", "W8A8", "16-bit"
    weight: str  # "int4/g64", "nvfp4/g16", "16-bit", ...
    act: str
    rank: int
    bits: float  # storage bits per weight element: codes + scales + low-rank branch + smoothing + bias
    reason: str


@dataclass
class ComponentReport:
    name: str
    class_name: str
    rule: str
    config: str
    rows: list[LayerRow] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)
    module_report: QuantReport | None = None

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")


@dataclass
class PipelineReport:
    """What ``quantize_pipeline`` did: per component, every weight layer (format, rank, bits, kept + why) and
    the bytes before/after. ``str(report)`` is a table; ``report.summary()`` one line per component."""

    pipeline: str
    components: dict[str, ComponentReport] = field(default_factory=dict)

    @property
    def rows(self) -> list[LayerRow]:
        return [r for c in self.components.values() for r in c.rows]

    def row(self, name: str, component: str | None = None) -> LayerRow:
        for r in self.rows:
            if r.name == name and (component is None or r.component == component):
                return r
        raise KeyError(name)

    def summary(self) -> str:
        lines = []
        for c in self.components.values():
            n_q = sum(r.status == "quantized" for r in c.rows)
            calib = c.calibration
            cal = "; no calibration run"
            if calib.get("ran"):
                cal = (
                    f"; calibrated on {calib['samples']} {calib['kind']} x {calib['steps']} steps "
                    f"(pipeline runs {calib['seconds']:.1f}s)"
                )
            if "quantize_seconds" in calib:
                cal += f"; quantize_model {calib['quantize_seconds']:.1f}s"
            lines.append(
                f"{c.name} ({c.class_name}, rule {c.rule}, {c.config}): {n_q}/{len(c.rows)} weight layers quantized; "
                f"{c.bytes_before / 2**20:.2f} MiB -> {c.bytes_after / 2**20:.2f} MiB ({c.compression:.2f}x){cal}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        header = ("component", "layer", "type", "status", "format", "weight", "act", "rank", "bits/w", "reason")
        rows = [header] + [
            (r.component, r.name, r.type, r.status, r.format, r.weight, r.act, str(r.rank), f"{r.bits:.2f}", r.reason)
            for r in self.rows
        ]
        widths = [min(64, max(len(row[i]) for row in rows)) for i in range(len(header) - 1)]
        lines = ["  ".join(row[i].ljust(widths[i]) for i in range(len(widths))) + "  " + row[-1] for row in rows]
        return "\n".join(lines + ["", self.summary()])

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "components": {
                k: {
                    "class": c.class_name,
                    "rule": c.rule,
                    "config": c.config,
                    "bytes_before": c.bytes_before,
                    "bytes_after": c.bytes_after,
                    "calibration": c.calibration,
                    "layers": [r.__dict__ for r in c.rows],
                }
                for k, c in self.components.items()
            },
        }


def _short_format(spec: QuantSpec) -> str:
    """``W4A4``, ``W4A16``, ``W8A8``: bits of the weight and activation formats (16 when kept)."""
    from vqsuite.formats import get_format

    w = get_format(spec.weight).bits if spec.weight else 16
    a = get_format(spec.act).bits if spec.act else 16
    return f"W{w}A{a}"


def _fmt_label(fmt: str | None, group: int | None, per: str = "ch") -> str:
    if fmt is None:
        return "16-bit"
    return f"{fmt}/g{group}" if group else f"{fmt}/{per}"


def _component_rows(component: str, model: nn.Module, report: QuantReport, rules: list[LayerRule]) -> list[LayerRow]:
    """Rows for every weight layer ``quantize_model`` saw, with the rule's role as the reason."""
    rows = []
    modules = dict(model.named_modules())
    for e in report.layers:
        m = modules.get(e.name)
        lr = layer_role(rules, e.name)
        if isinstance(m, QuantLayer):
            spec = m.spec
            n, k = m.gemm_shape
            act = _fmt_label(spec.act, spec.act_group_size, "tok" if spec.act_mode == "dynamic_per_token" else "t")
            reason = lr.role if lr is not None and lr.action != "quantize" else "recipe"
            rows.append(
                LayerRow(
                    component,
                    e.name,
                    e.type,
                    "quantized",
                    _short_format(spec),
                    _fmt_label(spec.weight, spec.weight_group_size),
                    act,
                    int(getattr(m, "rank", 0) or 0),
                    8 * module_nbytes(m) / max(n * k, 1),
                    reason + (f"; {e.reason}" if e.reason else ""),
                )
            )
            continue
        w = getattr(m, "weight", None)
        bits = 8 * module_nbytes(m) / w.numel() if isinstance(w, torch.Tensor) and w.numel() else 0.0
        reason = f"16-bit: {lr.role}" if lr is not None and lr.action == "keep" else e.reason
        rows.append(LayerRow(component, e.name, e.type, "kept", "16-bit", "16-bit", "16-bit", 0, bits, reason))
    return rows


# ------------------------------------------------------------------------------ calibration
def _call_params(pipe: Any) -> set[str]:
    try:
        return set(inspect.signature(pipe.__call__).parameters)
    except (TypeError, ValueError):
        return set()


def calibration_kind(pipe: Any) -> str:
    """``"text"`` (takes a prompt), ``"class"`` (class labels, DiT) or ``"unconditional"`` (DDPM)."""
    params = _call_params(pipe)
    if "prompt" in params:
        return "text"
    if "class_labels" in params:
        return "class"
    return "unconditional"


def _num_classes(pipe: Any, denoiser: nn.Module) -> int:
    cfg = getattr(denoiser, "config", None)
    n = getattr(cfg, "num_embeds_ada_norm", None) or getattr(cfg, "num_class_embeds", None)
    labels = getattr(pipe, "labels", None)
    if isinstance(labels, dict) and labels:
        return len(set(labels.values()))
    return int(n) if n else 1000


def make_calibration(
    pipe: Any,
    *,
    prompts: list[str] | None,
    num_samples: int,
    num_inference_steps: int,
    guidance_scale: float | None,
    seed: int,
    height: int | None,
    width: int | None,
    batch_size: int,
    call_kwargs: dict[str, Any],
    stats: dict[str, Any],
):
    """A ``fn(denoiser)`` that runs ``pipe`` over the calibration samples (the denoiser is ``pipe``'s own)."""
    kind = calibration_kind(pipe)
    params = _call_params(pipe)
    accepts_any = any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(pipe.__call__).parameters.values()
    )

    def accepted(k: str) -> bool:
        return k in params or accepts_any

    base: dict[str, Any] = {"num_inference_steps": num_inference_steps}
    if accepted("output_type"):
        base["output_type"] = "latent"  # the VAE decode teaches the denoiser nothing
    for k, v in (("guidance_scale", guidance_scale), ("height", height), ("width", width)):
        if v is not None and accepted(k):
            base[k] = v
    if "clean_caption" in params:  # PixArt's caption cleaning needs bs4/ftfy; calibration prompts are clean
        base["clean_caption"] = False
    base.update(call_kwargs)
    base.pop("generator", None)

    def run(denoiser: nn.Module) -> None:
        t0 = time.perf_counter()
        bar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        n_calls = 0
        try:
            with torch.no_grad():
                for start in range(0, num_samples, batch_size):
                    n = min(batch_size, num_samples - start)
                    gen = torch.Generator(device="cpu").manual_seed(seed + start)
                    kw = dict(base, generator=gen)
                    if kind == "text":
                        pipe(prompt=prompts[start : start + n], **kw)
                    elif kind == "class":
                        labels = torch.randint(0, _num_classes(pipe, denoiser), (n,), generator=gen).tolist()
                        pipe(class_labels=labels, **kw)
                    else:
                        pipe(batch_size=n, **kw)
                    n_calls += 1
        finally:
            if hasattr(pipe, "_progress_bar_config"):
                pipe._progress_bar_config = bar
        stats.update(ran=True, calls=n_calls, seconds=time.perf_counter() - t0)

    stats.update(kind={"text": "prompts", "class": "class labels", "unconditional": "samples"}[kind])
    stats.update(samples=num_samples, steps=num_inference_steps, ran=False)
    return run


def _needs_calibration(cfg: QuantConfig) -> bool:
    specs = [cfg.default] + [s for _, s in cfg.overrides if s is not None]
    return cfg.method in ("svdquant", "gptq") or any(s.act_mode == "static" for s in specs)


# ------------------------------------------------------------------------------ entry point
def _component_configs(
    pipe: Any, denoiser_name: str, config: Any, components: Any
) -> dict[str, tuple[str | QuantConfig | QuantSpec | dict, str]]:
    """Name -> (recipe, how it was chosen) for the non-denoiser components to quantize."""
    if components is None:
        return {}
    if isinstance(components, str):
        components = [components]
    if isinstance(components, dict):
        items = list(components.items())
    else:
        items = [(c, None) for c in components]
    comps = pipe.components
    out = {}
    for name, cfg in items:
        if name == denoiser_name:
            continue  # the denoiser is always quantized with ``config``
        if not isinstance(comps.get(name), nn.Module):
            mods = ", ".join(k for k, v in comps.items() if isinstance(v, nn.Module))
            raise UserError(f"components: {name!r} is not a module of {type(pipe).__name__} (modules: {mods})")
        out[name] = (weight_only_config(config), "weight-only") if cfg is None else (cfg, "user config")
    return out


def quantize_pipeline(
    pipe: Any,
    config: str | QuantConfig | QuantSpec | dict = "svdquant-int4",
    calib_prompts: list[str] | None = None,
    num_calib_prompts: int = DEFAULT_NUM_CALIB_PROMPTS,
    num_inference_steps: int | None = None,
    components: list[str] | dict[str, Any] | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    *,
    calib_batch_size: int = 4,
    denoiser: str | None = None,
    rule: ArchRule | None = None,
    freeze: bool = True,
    **call_kwargs: Any,
) -> Any:
    """Quantize a loaded diffusers pipeline in place and return it; ``pipe(...).images`` works after.

    Args:
        pipe: a diffusers pipeline (text-to-image, class-conditional DiT, unconditional DDPM).
        config: the denoiser's recipe: a preset name (``"svdquant-int4"``, ``"svdquant-nvfp4"``, ``"w4a4"``,
            ``"nvfp4"``, ...), a ``QuantConfig``, a ``QuantSpec`` or a config dict. The architecture rule is folded
            in (embedders, first/last layers 16-bit, adaLN modulation W4A16, ...); the config's own overrides win.
        calib_prompts: prompts for calibration; default: the prompts shipped with vqsuite.
        num_calib_prompts: at most this many prompts (or class labels / unconditional samples) are run.
        num_inference_steps: steps of each calibration run (default 20).
        components: other components to quantize too: a list of names (weight-only W4A16/W8A16 of ``config``'s
            weight format) or a dict ``{name: config or None}``. Text encoders are left alone by default.
        guidance_scale, seed, height, width: passed to the calibration runs (the pipeline's defaults otherwise);
            sample ``i`` uses ``torch.Generator().manual_seed(seed + batch start)``.
        calib_batch_size: prompts per pipeline call during calibration.
        denoiser: the denoiser's component name when it is not ``transformer``/``unet``.
        rule: an :class:`~vqsuite.pipelines.rules.ArchRule` instead of the registered one.
        freeze: pack weights now (see :func:`vqsuite.quantize_model`).
        **call_kwargs: extra keyword arguments of the calibration calls (``use_resolution_binning=False``, ...).

    The report is ``pipe.vqsuite_report`` (:class:`PipelineReport`); each quantized component also carries its
    module-level ``vqsuite_report`` and ``vqsuite_config``. Calibration runs only when the recipe needs data
    (``method="svdquant"`` or static activation scales).
    """
    den_name, den = find_denoiser(pipe, denoiser)
    others = _component_configs(pipe, den_name, config, components)
    base_cfg = resolve_config(config)
    if rule is None:
        rule, generic = rule_for(den)
    else:
        generic = False
    if generic:
        logger.warning(
            "no layer rule for denoiser %s; falling back to the generic rule (every nn.Linear and 1x1 conv quantized, "
            "first/last layers and embedders 16-bit); register one with vqsuite.pipelines.rules.register_arch_rule",
            type(den).__name__,
        )
    cfg = denoiser_config(den, base_cfg, rule)
    rules = rule.layer_rules(den)

    report = PipelineReport(pipeline=type(pipe).__name__)
    stats: dict[str, Any] = {"ran": False}
    calib = None
    if _needs_calibration(cfg):
        kind = calibration_kind(pipe)
        prompts = None
        if kind == "text":
            prompts = list(calib_prompts) if calib_prompts is not None else default_calib_prompts()
            if not prompts:
                raise UserError("calib_prompts is empty")
            if len(prompts) > num_calib_prompts:
                logger.info("using %d of %d calibration prompts (num_calib_prompts)", num_calib_prompts, len(prompts))
            prompts = prompts[:num_calib_prompts]
        n = len(prompts) if prompts is not None else num_calib_prompts
        if n <= 0:
            raise UserError(f"num_calib_prompts={num_calib_prompts} must be positive")
        if calib_batch_size <= 0:
            raise UserError(f"calib_batch_size={calib_batch_size} must be positive")
        calib = make_calibration(
            pipe,
            prompts=prompts,
            num_samples=n,
            num_inference_steps=num_inference_steps or DEFAULT_CALIB_STEPS,
            guidance_scale=guidance_scale,
            seed=seed,
            height=height,
            width=width,
            batch_size=calib_batch_size,
            call_kwargs=call_kwargs,
            stats=stats,
        )
        logger.info(
            "calibrating %s.%s (%s) on %d %s x %d steps",
            type(pipe).__name__,
            den_name,
            type(den).__name__,
            n,
            stats["kind"],
            stats["steps"],
        )

    specs = [cfg.default] + [s for _, s in cfg.overrides if s is not None]
    if any(s.act_mode == "static" and s.act_granularity != "pooled" for s in specs):
        from vqsuite.calibrators.timestep import attach_step_tracker

        # per-step static scales: the denoiser publishes the step (index, t, CFG branch) while calibrating and
        # whenever the pipeline samples afterwards
        attach_step_tracker(pipe, denoiser=den)
    t0 = time.perf_counter()
    quantize_model(den, cfg, calib_data=calib, freeze=freeze)
    stats["quantize_seconds"] = time.perf_counter() - t0
    mrep: QuantReport = den.vqsuite_report
    if not mrep.quantized:  # a silent no-op is the worst outcome: say which denoiser, which rule, and why
        reasons = skip_reasons(mrep)
        msg = (
            f"quantize_pipeline quantized NOTHING in {type(pipe).__name__}.{den_name} ({type(den).__name__}, rule "
            f"{rule.name}{' (generic fallback)' if generic else ''}): the pipeline is unchanged"
            + (f"; reasons: {'; '.join(reasons)}" if reasons else "; it has no supported layer")
        )
        logger.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    report.components[den_name] = ComponentReport(
        den_name,
        type(den).__name__,
        rule.name + (" (fallback)" if generic else ""),
        cfg.name or "custom",
        _component_rows(den_name, den, mrep, rules),
        mrep.bytes_before,
        mrep.bytes_after,
        dict(stats),
        mrep,
    )
    for name, (ccfg, how) in others.items():
        mod = pipe.components[name]
        c = resolve_config(ccfg)
        quantize_model(mod, c, freeze=freeze)
        rep = mod.vqsuite_report
        report.components[name] = ComponentReport(
            name,
            type(mod).__name__,
            how,
            c.name or "custom",
            _component_rows(name, mod, rep, []),
            rep.bytes_before,
            rep.bytes_after,
            {"ran": False},
            rep,
        )
    pipe.vqsuite_report = report
    for line in report.summary().splitlines():
        logger.info("%s", line)
    from vqsuite.pipelines.diffusers_io import attach_lora_support_if_available

    attach_lora_support_if_available(pipe)  # pipe.load_lora_weights on the quantized layers
    return pipe


def pipeline_nbytes(pipe: Any) -> dict[str, int]:
    """Bytes of each module component of ``pipe`` (:func:`vqsuite.module_nbytes`)."""
    return {k: module_nbytes(v) for k, v in pipe.components.items() if isinstance(v, nn.Module)}
