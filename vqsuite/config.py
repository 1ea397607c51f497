"""Quantization recipes: :class:`QuantSpec` (one layer), :class:`QuantConfig` (a whole model) and named presets.

Both are frozen, validated dataclasses: a bad value raises :class:`~vqsuite.errors.ConfigError` (a ``ValueError``)
naming it. They serialise to plain dicts (``to_dict``/``from_dict``) carrying a ``version``, stored as JSON beside
quantized weights.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch

from vqsuite.errors import ConfigError
from vqsuite.formats import get_format, list_formats

CONFIG_VERSION = 1

ActMode = Literal["none", "dynamic_per_token", "dynamic_per_group", "static"]
KernelPreference = Literal["auto", "triton", "reference"]
#: how layer state is computed: plain round-to-nearest, SVDQuant (smoothing + low-rank + quantized residual),
#: ViT PTQ (RTN weights plus PTQ4ViT / RepQ-ViT activation quantizers, :mod:`vqsuite.calibrators.vit_ptq`), GPTQ
#: weights for every layer (:mod:`vqsuite.calibrators.gptq_model`), or a QAT model frozen by
#: :func:`vqsuite.finetune.freeze_qat` (recorded in checkpoints; not a ``quantize_model`` recipe)
METHODS: tuple[str, ...] = ("rtn", "svdquant", "vit-ptq", "gptq", "qat")
#: methods that need calibration data (GPTQ refuses to run without it; SVDQuant falls back to a data-free branch)
CALIBRATED_METHODS: tuple[str, ...] = ("svdquant", "vit-ptq", "gptq")
ACT_MODES: tuple[str, ...] = ("none", "dynamic_per_token", "dynamic_per_group", "static")
KERNEL_PREFERENCES: tuple[str, ...] = ("auto", "triton", "reference")
#: how static activation scales follow the denoising step (see :mod:`vqsuite.nn.steps`)
ACT_GRANULARITIES: tuple[str, ...] = ("pooled", "per_step", "bucketed")
#: how a static activation range is chosen from calibration data (see :mod:`vqsuite.calibrators.ranges`)
ACT_RANGES: tuple[str, ...] = ("minmax", "ema", "percentile", "mse")
#: QuantSpec fields added after version 1 first shipped; ``to_dict`` leaves them out at their defaults, so a
#: recipe that does not use them reads the same in older vqsuite versions
_OPTIONAL_SPEC_FIELDS: dict[str, Any] = {
    "act_granularity": "pooled",
    "n_buckets": None,
    "act_range": "minmax",
    "weight_range": "minmax",
}
#: how weight scales are chosen: absmax per group, or an L_p search of the clipping ratio per group
WEIGHT_RANGES: tuple[str, ...] = ("minmax", "mse")
SCALE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _check_format(value: str | None, field_name: str) -> None:
    if value is not None and value not in list_formats():
        raise ConfigError(f"{field_name}={value!r} is not a known format; choose one of {', '.join(list_formats())}")


def _check_group(value: int | None, field_name: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"{field_name}={value!r} must be a positive integer or None")


#: smallest group a layer falls back to when the recipe's group does not divide its reduction length
MIN_FALLBACK_GROUP = 16
#: the 8-bit weight format a 4-bit-packed one falls back to on an odd reduction length (two codes per byte need an
#: even K; such layers, depthwise 3x3 or RGB stems, are tiny, so the byte per weight costs little)
ODD_K_WEIGHT_FORMATS: dict[str, str] = {
    "int2": "int8",
    "int3": "int8",
    "int4": "int8",
    "int4_asym": "int8_asym",
    "fp4_e2m1": "fp8_e4m3",
}


def _halved_group(group: int, length: int) -> int | None:
    """``group`` halved until it divides ``length``, not below :data:`MIN_FALLBACK_GROUP`; ``None`` if none does."""
    while group > MIN_FALLBACK_GROUP and length % group != 0 and group % 2 == 0:
        group //= 2
    return group if length % group == 0 else None


@dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized.

    Attributes:
        weight: weight format name (see :func:`vqsuite.formats.list_formats`), or ``None`` to keep 16-bit weights.
        weight_group_size: group length along K (in_features); ``None`` means one scale per output channel.
            Block formats (NVFP4 16, MXFP4 32) fix it.
        act: activation format name, or ``None`` for 16-bit activations.
        act_mode: ``"none"``, ``"dynamic_per_token"`` (one scale per row of ``x [M, K]``),
            ``"dynamic_per_group"`` (groups of ``act_group_size`` along K, per token) or ``"static"``
            (one calibrated per-tensor scale).
        act_group_size: group length for ``dynamic_per_group``.
        rank: rank of the 16-bit low-rank branch (``QLinearLowRank``); 0 means none.
        scale_dtype: storage dtype of float weight scales: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        kernel: kernel preference for frozen layers: ``"auto"``, ``"triton"`` or ``"reference"``.
        act_granularity: static scales only: one scale for every step (``"pooled"``), one per step of the
            calibration trajectory (``"per_step"``) or one per bucket of steps (``"bucketed"``); the layer reads
            the current step from the denoiser's step hook.
        n_buckets: number of scale slots: the buckets of ``"bucketed"`` (required), or the steps of
            ``"per_step"`` (filled in by calibration when ``None``).
        act_range: how calibration chooses a static range: ``"minmax"``, ``"ema"`` (running min/max, momentum
            0.95), ``"percentile"`` (99.99 % of |x|) or ``"mse"`` (L_p search, p = 2.4, 1 % steps).
        weight_range: ``"minmax"`` (absmax per group) or ``"mse"`` (per-group clipping by L_p search, p = 2.4,
            1 % steps; symmetric formats), applied by ``quantize_model`` before packing.
    """

    weight: str | None = "int8"
    weight_group_size: int | None = None
    act: str | None = None
    act_mode: ActMode = "none"
    act_group_size: int | None = None
    rank: int = 0
    scale_dtype: str = "float32"
    kernel: KernelPreference = "auto"
    act_granularity: str = "pooled"
    n_buckets: int | None = None
    act_range: str = "minmax"
    weight_range: str = "minmax"

    def __post_init__(self) -> None:
        _check_format(self.weight, "weight")
        _check_format(self.act, "act")
        if self.act is not None and get_format(self.act).offset:
            raise ConfigError(f"act={self.act!r} is a mid-rise weight format (no zero level); not for activations")
        _check_group(self.weight_group_size, "weight_group_size")
        _check_group(self.act_group_size, "act_group_size")
        if self.act_mode not in ACT_MODES:
            raise ConfigError(f"act_mode={self.act_mode!r} must be one of {', '.join(ACT_MODES)}")
        if self.kernel not in KERNEL_PREFERENCES:
            raise ConfigError(f"kernel={self.kernel!r} must be one of {', '.join(KERNEL_PREFERENCES)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"scale_dtype={self.scale_dtype!r} must be one of {', '.join(SCALE_DTYPES)}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ConfigError(f"rank={self.rank!r} must be an integer >= 0")
        if self.weight is None and self.act is None and self.rank == 0:
            raise ConfigError("weight=None and act=None quantize nothing; exclude the layer instead")
        # block formats carry their group length; fill it in, refuse a contradicting one
        for fmt_field, group_field in (("weight", "weight_group_size"), ("act", "act_group_size")):
            fmt_name = getattr(self, fmt_field)
            if fmt_name is None:
                continue
            block = get_format(fmt_name).block_size
            group = getattr(self, group_field)
            if block is not None:
                if group is not None and group != block:
                    raise ConfigError(f"{group_field}={group} is not allowed for {fmt_name}, whose blocks are {block}")
                object.__setattr__(self, group_field, block)
        if self.act is None:
            if self.act_mode != "none":
                raise ConfigError(f"act_mode={self.act_mode!r} needs an activation format (act=None)")
            if self.act_group_size is not None:
                raise ConfigError(f"act_group_size={self.act_group_size} given without an activation format")
        else:
            if self.act_mode == "none":
                raise ConfigError(f"act={self.act!r} needs an act_mode other than 'none'")
            block = get_format(self.act).block_size
            if self.act_mode == "dynamic_per_group" and self.act_group_size is None:
                raise ConfigError("act_mode='dynamic_per_group' needs act_group_size")
            if self.act_mode in ("dynamic_per_token", "static") and self.act_group_size is not None and block is None:
                raise ConfigError(f"act_group_size={self.act_group_size} only applies to act_mode='dynamic_per_group'")
            if block is not None and self.act_mode != "dynamic_per_group":
                raise ConfigError(f"act={self.act!r} is a block format: act_mode must be 'dynamic_per_group'")
            if self.act_mode == "static" and get_format(self.act).asymmetric:
                raise ConfigError(f"act_mode='static' supports symmetric formats only, not act={self.act!r}")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ConfigError(f"act_granularity={self.act_granularity!r} must be one of {', '.join(ACT_GRANULARITIES)}")
        if self.act_range not in ACT_RANGES:
            raise ConfigError(f"act_range={self.act_range!r} must be one of {', '.join(ACT_RANGES)}")
        if self.act_mode != "static" and (self.act_granularity != "pooled" or self.act_range != "minmax"):
            raise ConfigError(
                f"act_granularity={self.act_granularity!r} and act_range={self.act_range!r} apply to "
                f"act_mode='static' only, not act_mode={self.act_mode!r}"
            )
        if self.weight_range not in WEIGHT_RANGES:
            raise ConfigError(f"weight_range={self.weight_range!r} must be one of {', '.join(WEIGHT_RANGES)}")
        if self.weight_range != "minmax" and (self.weight is None or get_format(self.weight).asymmetric):
            raise ConfigError(
                f"weight_range={self.weight_range!r} needs a symmetric weight format, not {self.weight!r}"
            )
        _check_group(self.n_buckets, "n_buckets")
        if self.act_granularity == "pooled" and self.n_buckets is not None:
            raise ConfigError(f"n_buckets={self.n_buckets} needs act_granularity='per_step' or 'bucketed'")
        if self.act_granularity == "bucketed" and self.n_buckets is None:
            raise ConfigError("act_granularity='bucketed' needs n_buckets")

    # ------------------------------------------------------------------ helpers
    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def incompatibility(self, in_features: int, *, act_features: int | None = None) -> str | None:
        """Why this spec cannot quantize a layer whose GEMM reduction length is ``in_features``, or ``None``.

        ``act_features`` is the length activation groups run along (the input channels of a conv), when it
        differs from ``in_features`` (a conv's ``C/groups * kh * kw``).
        """
        if self.weight is not None and self.weight_group_size is not None:
            if in_features % self.weight_group_size != 0:
                return f"weight_group_size={self.weight_group_size} must divide in_features={in_features}"
        if self.weight is not None and get_format(self.weight).storage_bits == 4 and in_features % 2 != 0:
            return f"4-bit packing ({self.weight}) needs an even in_features, got {in_features}"
        a = in_features if act_features is None else act_features
        if self.act_mode == "dynamic_per_group" and a % self.act_group_size != 0:
            return f"act_group_size={self.act_group_size} must divide the activation channels {a}"
        return None

    def with_fitting_groups(self, in_features: int, *, act_features: int | None = None) -> QuantSpec | None:
        """The same recipe with integer group sizes halved (down to :data:`MIN_FALLBACK_GROUP`) until they divide
        the layer's reduction length, or ``None`` when no such spec exists (block formats such as NVFP4/MXFP4 fix
        their block; a spec that already fits is returned as is)."""
        spec = self
        if spec.incompatibility(in_features, act_features=act_features) is None:
            return spec
        a = in_features if act_features is None else act_features
        for attr, length, fmt_name, used in (
            ("weight_group_size", in_features, self.weight, self.weight is not None),
            ("act_group_size", a, self.act, self.act_mode == "dynamic_per_group"),
        ):
            g = getattr(spec, attr)
            if not used or g is None or length % g == 0:
                continue
            if get_format(fmt_name).block_size is not None:
                return None
            g = _halved_group(g, length)
            if g is None:
                return None
            spec = spec.replace(**{attr: g})
        return spec if spec.incompatibility(in_features, act_features=act_features) is None else None

    def with_fallbacks(
        self, in_features: int, *, act_features: int | None = None
    ) -> tuple[QuantSpec, tuple[str, ...]] | None:
        """The nearest spec a layer of GEMM reduction length ``in_features`` (activation channels ``act_features``)
        accepts, with one note per change, or ``None`` when there is none. Steps, each only where needed:

        1. an integer group that does not divide its length is halved, down to :data:`MIN_FALLBACK_GROUP`
           (K = 288: g64 -> g32), as :meth:`with_fitting_groups` does;
        2. when no halved group divides (K = 9, 25, 27, 147), weights get one scale per output channel and
           activations one per token (over the channels);
        3. a weight format packed two codes per byte (INT4, INT3, INT2, FP4) on an odd K takes the 8-bit format of
           its family (:data:`ODD_K_WEIGHT_FORMATS`: INT4 -> INT8): the frozen storage needs an even K.

        Block formats (NVFP4 16, MXFP4 32) are the block: a block that does not divide gives ``None``.
        """
        if self.incompatibility(in_features, act_features=act_features) is None:
            return self, ()
        a = in_features if act_features is None else act_features
        spec, notes = self, []
        for attr, length, fmt_name, used, per_row in (
            ("weight_group_size", in_features, self.weight, self.weight is not None, {}),
            ("act_group_size", a, self.act, self.act_mode == "dynamic_per_group", {"act_mode": "dynamic_per_token"}),
        ):
            g = getattr(spec, attr)
            if not used or g is None or length % g == 0:
                continue
            if get_format(fmt_name).block_size is not None:
                return None
            halved = _halved_group(g, length)
            if halved is not None:
                spec = spec.replace(**{attr: halved})
                notes.append(f"{attr} {g} -> {halved}")
            else:
                spec = spec.replace(**{attr: None}, **per_row)
                notes.append(f"{attr} {g} -> " + ("per token" if per_row else "per channel") + f" ({length=})")
        if spec.weight is not None and get_format(spec.weight).storage_bits == 4 and in_features % 2 != 0:
            wide = ODD_K_WEIGHT_FORMATS.get(spec.weight)
            if wide is None or spec.weight_group_size is not None:
                return None
            notes.append(f"weight {spec.weight} -> {wide} (4-bit packing needs an even K, got {in_features})")
            spec = spec.replace(weight=wide)
        if spec.incompatibility(in_features, act_features=act_features) is not None:
            return None
        return spec, tuple(notes)

    def validate_for(self, in_features: int, **kw: Any) -> None:
        reason = self.incompatibility(in_features, **kw)
        if reason is not None:
            raise ConfigError(reason)

    def replace(self, **changes: Any) -> QuantSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, default in _OPTIONAL_SPEC_FIELDS.items():
            if d[k] == default:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        if not isinstance(d, dict):
            raise ConfigError(f"a QuantSpec dict is expected, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown QuantSpec field(s): {', '.join(unknown)}")
        return cls(**d)

    def short(self) -> str:
        """Compact label like ``W:int4/g64 A:int4/g64 r32``."""
        w = (
            "W:16"
            if self.weight is None
            else f"W:{self.weight}" + (f"/g{self.weight_group_size}" if self.weight_group_size else "/ch")
        )
        if self.act is None:
            a = "A:16"
        elif self.act_mode == "dynamic_per_group":
            a = f"A:{self.act}/g{self.act_group_size}"
        else:
            a = f"A:{self.act}/" + ("tok" if self.act_mode == "dynamic_per_token" else "static")
            if self.act_granularity != "pooled":
                a += "/step" if self.act_granularity == "per_step" else f"/b{self.n_buckets}"
        return f"{w} {a}" + (f" r{self.rank}" if self.rank else "")


@dataclass(frozen=True)
class QuantConfig:
    """A model's recipe: a default spec, fnmatch-pattern overrides (first match wins) and exclusions.

    ``overrides`` maps a module-name pattern (``"*.attn.*"``, ``"head"``) to a :class:`QuantSpec`, or to
    ``None`` to keep matching layers in float. ``exclude`` lists patterns that are never quantized.
    A dict passed for ``overrides`` is kept in insertion order.
    """

    default: QuantSpec = field(default_factory=QuantSpec)
    overrides: tuple[tuple[str, QuantSpec | None], ...] = ()
    exclude: tuple[str, ...] = ()
    name: str | None = None
    method: str = "rtn"
    method_options: tuple[tuple[str, Any], ...] = ()
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} must be one of {', '.join(METHODS)}")
        opts = self.method_options
        opts = tuple(sorted(opts.items())) if isinstance(opts, dict) else tuple(tuple(o) for o in opts)
        object.__setattr__(self, "method_options", opts)
        if not isinstance(self.default, QuantSpec):
            raise ConfigError(f"default={self.default!r} must be a QuantSpec")
        ov = self.overrides
        items = list(ov.items()) if isinstance(ov, dict) else [tuple(p) for p in ov]
        for item in items:
            if len(item) != 2 or not isinstance(item[0], str):
                raise ConfigError(f"override {item!r} must be a (pattern, QuantSpec | None) pair")
            if item[1] is not None and not isinstance(item[1], QuantSpec):
                raise ConfigError(f"override for {item[0]!r} must be a QuantSpec or None, got {item[1]!r}")
        object.__setattr__(self, "overrides", tuple((p, s) for p, s in items))
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        else:
            object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"config version={self.version} is not supported (this vqsuite reads {CONFIG_VERSION})")

    def resolve(self, module_name: str) -> tuple[QuantSpec | None, str]:
        """The spec for ``module_name`` and why: ``(spec, "default" | "override 'pat'")`` or ``(None, reason)``."""
        for pat in self.exclude:
            if fnmatch.fnmatchcase(module_name, pat):
                return None, f"excluded by pattern {pat!r}"
        for pat, spec in self.overrides:
            if fnmatch.fnmatchcase(module_name, pat):
                if spec is None:
                    return None, f"kept in float by override {pat!r}"
                return spec, f"override {pat!r}"
        return self.default, "default"

    def spec_for(self, module_name: str) -> QuantSpec | None:
        return self.resolve(module_name)[0]

    def with_overrides(self, **kw: Any) -> QuantConfig:
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "default": self.default.to_dict(),
            "overrides": [[p, None if s is None else s.to_dict()] for p, s in self.overrides],
            "exclude": list(self.exclude),
            "method": self.method,
            "method_options": dict(self.method_options),
        }

    @property
    def options(self) -> dict[str, Any]:
        """``method_options`` as a dict (e.g. SVDQuant's ``num_grids``, ``gptq``)."""
        return dict(self.method_options)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a QuantConfig dict is expected, got {type(d).__name__}")
        version = d.get("version")
        if version != CONFIG_VERSION:
            raise ConfigError(f"config version={version!r} is not supported (this vqsuite reads {CONFIG_VERSION})")
        unknown = sorted(set(d) - {"version", "name", "default", "overrides", "exclude", "method", "method_options"})
        if unknown:
            raise ConfigError(f"unknown QuantConfig field(s): {', '.join(unknown)}")
        if "default" not in d:
            raise ConfigError("a QuantConfig dict needs a 'default' QuantSpec")
        return cls(
            default=QuantSpec.from_dict(d["default"]),
            overrides=tuple((p, None if s is None else QuantSpec.from_dict(s)) for p, s in d.get("overrides", [])),
            exclude=tuple(d.get("exclude", ())),
            name=d.get("name"),
            method=d.get("method", "rtn"),
            method_options=d.get("method_options", {}),
            version=version,
        )


# ---------------------------------------------------------------------- presets
_PRESETS: dict[str, tuple[QuantConfig, str]] = {}


def register_preset(name: str, config: QuantConfig, description: str) -> None:
    if name in _PRESETS:
        raise ConfigError(f"preset {name!r} is already registered")
    _PRESETS[name] = (replace(config, name=name), description)


def list_presets() -> list[str]:
    """Names of the registered presets, sorted."""
    return sorted(_PRESETS)


def describe_presets() -> dict[str, str]:
    return {k: _PRESETS[k][1] for k in list_presets()}


def get_preset(name: str) -> QuantConfig:
    try:
        return _PRESETS[name][0]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}") from None


def resolve_config(config: str | QuantConfig | QuantSpec | dict[str, Any]) -> QuantConfig:
    """Accept a preset name, a QuantConfig, a single QuantSpec (applied everywhere) or a config dict."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, QuantSpec):
        return QuantConfig(default=config)
    if isinstance(config, str):
        return get_preset(config)
    if isinstance(config, dict):
        return QuantConfig.from_dict(config)
    raise ConfigError(f"config={config!r} must be a preset name, QuantConfig, QuantSpec or dict")


def _spec(method: str = "rtn", **kw: Any) -> QuantConfig:
    return QuantConfig(default=QuantSpec(**kw), method=method)


register_preset("w8a16", _spec(weight="int8"), "INT8 per-channel weights, 16-bit activations")
register_preset(
    "w8a8",
    _spec(weight="int8", act="int8", act_mode="dynamic_per_token"),
    "INT8 per-channel weights, dynamic per-token INT8 activations",
)
register_preset(
    "w8a8-fp8",
    _spec(weight="fp8_e4m3", act="fp8_e4m3", act_mode="dynamic_per_token"),
    "FP8 E4M3 per-channel weights, dynamic per-token FP8 E4M3 activations",
)
register_preset(
    "w2a8",
    _spec(weight="int2", act="int8", act_mode="dynamic_per_token"),
    "INT2 per-channel weights (stored packed 4-bit), dynamic per-token INT8 activations",
)
register_preset(
    "w4a4-static",
    _spec(weight="int4", act="int4", act_mode="static", act_granularity="per_step"),
    "EfficientDM's setting: INT4 per-channel weights, static per-tensor INT4 activations with one scale per "
    "denoising step (needs calibration: calib_data, or quantize_pipeline's calibration runs)",
)
register_preset(
    "w4a8-static",
    _spec(weight="int4", act="int8", act_mode="static", act_granularity="per_step"),
    "INT4 per-channel weights, static per-tensor INT8 activations with one scale per denoising step (needs "
    "calibration)",
)
register_preset(
    "w4a16",
    _spec(weight="int4", weight_group_size=64, scale_dtype="bfloat16"),
    "INT4 weights in groups of 64 (bf16 scales), 16-bit activations",
)
register_preset(
    "w4a8",
    _spec(weight="int4", weight_group_size=64, scale_dtype="bfloat16", act="int8", act_mode="dynamic_per_token"),
    "INT4 g64 weights, dynamic per-token INT8 activations",
)
register_preset(
    "w4a4",
    _spec(
        weight="int4",
        weight_group_size=64,
        scale_dtype="bfloat16",
        act="int4",
        act_mode="dynamic_per_group",
        act_group_size=64,
    ),
    "INT4 g64 weights and dynamic per-token g64 INT4 activations, no low-rank branch (the RTN baseline)",
)
register_preset(
    "nvfp4",
    _spec(weight="nvfp4", act="nvfp4", act_mode="dynamic_per_group"),
    "NVFP4 weights and activations (E2M1, blocks of 16, E4M3 scales, FP32 tensor scale), RTN",
)
register_preset(
    "mxfp4",
    _spec(weight="mxfp4", act="mxfp4", act_mode="dynamic_per_group"),
    "MXFP4 weights and activations (E2M1, blocks of 32, E8M0 scales), RTN",
)
register_preset(
    "w4a16-nvfp4",
    _spec(weight="nvfp4"),
    "NVFP4 weights, 16-bit activations",
)
register_preset(
    "svdquant-int4",
    _spec(
        method="svdquant",
        weight="int4",
        weight_group_size=64,
        scale_dtype="bfloat16",
        act="int4",
        act_mode="dynamic_per_group",
        act_group_size=64,
        rank=32,
    ),
    "SVDQuant W4A4: smoothing + rank-32 16-bit branch, INT4 g64 residual and dynamic INT4 g64 activations",
)
register_preset(
    "svdquant-nvfp4",
    _spec(method="svdquant", weight="nvfp4", act="nvfp4", act_mode="dynamic_per_group", rank=32),
    "SVDQuant W4A4 NVFP4: smoothing + rank-32 16-bit branch, NVFP4 residual and activations",
)
register_preset(
    "svdquant-int4-w8a8",
    _spec(method="svdquant", weight="int8", act="int8", act_mode="dynamic_per_token", rank=32),
    "SVDQuant with 8-bit both sides: smoothing + rank-32 branch, INT8 per-channel residual, per-token INT8 acts",
)

register_preset(
    "w4a16-asym",
    _spec(weight="int4_asym", weight_group_size=64, scale_dtype="bfloat16"),
    "asymmetric INT4 weights (zero point per group of 64, bf16 scales), 16-bit activations",
)
#: GPTQ variants of the plain presets: name -> (base preset, what the base is)
_GPTQ_PRESETS: dict[str, str] = {
    "w8a16-gptq": "w8a16",
    "w8a8-gptq": "w8a8",
    "w4a16-gptq": "w4a16",
    "w4a8-gptq": "w4a8",
    "w4a16-asym-gptq": "w4a16-asym",
}
for _name, _base in _GPTQ_PRESETS.items():
    register_preset(
        _name,
        replace(get_preset(_base), method="gptq"),
        f"{describe_presets()[_base]}; GPTQ weights (Hessians from one float pass, damp 0.01; needs calib_data)",
    )

#: ViT PTQ variants: name suffix -> (weight range, method_options); weights per output channel
_VIT_PTQ_VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "ptq": ("mse", {"softmax": "log2", "gelu": "twin", "ln_reparam": True},
            "RepQ-ViT LayerNorm reparameterization + log-sqrt2 softmax, PTQ4ViT twin-uniform GELU"),
    "repq": ("mse", {"softmax": "log2", "gelu": "uniform", "ln_reparam": True},
             "RepQ-ViT: LayerNorm reparameterization + log-sqrt2 softmax, uniform elsewhere"),
    "ptq4vit": ("mse", {"softmax": "twin", "gelu": "twin", "ln_reparam": False},
                "PTQ4ViT twin-uniform softmax and GELU (range-select form), uniform elsewhere"),
    "minmax": ("minmax", {"softmax": "uniform", "gelu": "uniform", "ln_reparam": False},
               "plain per-tensor min-max activations (the baseline)"),
}  # fmt: skip
for _bits, _wfmt in ((8, "int8"), (6, "int6"), (4, "int4"), (3, "int3")):
    for _suffix, (_wrange, _opts, _desc) in _VIT_PTQ_VARIANTS.items():
        register_preset(
            f"vit-w{_bits}a{_bits}-{_suffix}",
            QuantConfig(
                default=QuantSpec(weight=_wfmt, weight_range=_wrange),
                method="vit-ptq",
                method_options={"act_bits": _bits, **_opts},
            ),
            f"timm ViT W{_bits}A{_bits} PTQ (static, calib_data): {_desc}; per-channel {_wrange} weights",
        )
