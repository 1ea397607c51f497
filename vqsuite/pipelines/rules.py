"""Per-architecture layer rules for diffusion denoisers: which layers are quantized with the recipe, which get
weights only (W4A16: adaLN modulation), which lose the low-rank branch and which stay 16-bit.

A rule is a small registry entry keyed by the denoiser's class name (``FluxTransformer2DModel``, ...) holding
fnmatch patterns over ``named_modules()`` names, in priority order (first match wins, as in
:class:`~vqsuite.config.QuantConfig`). :func:`denoiser_config` turns a recipe (preset) plus a rule into one
``QuantConfig`` whose overrides encode the rule, so ``quantize_model`` and checkpoints need nothing else.

The 16-bit layers follow deepcompressor's model configs (METHODS.md §1.3): ``embed`` (input, time/text embedders,
final norm and projection), ``transformer_proj_in/out``, ``resblock_shortcut``, ``resblock_time_proj``,
``down_sample``/``up_sample``; activations of the adaLN modulation linears (``transformer_norm``,
``transformer_add_norm``) stay 16-bit, so they are W4A16 with the recipe's weight format and no low-rank branch.
PixArt also keeps ``attn_add`` (the cross-attention key/value projections of the text stream) fully 16-bit.
UNet ResBlock convs (``conv1``/``conv2``) take the recipe with smoothing and a conv low-rank branch
(:mod:`vqsuite.nn.conv_lowrank`; deepcompressor skips smoothing and low rank for resblocks, nunchaku keeps the
UNet's resnet convs 16-bit). conv_in/conv_out and the samplers stay 16-bit: on mini-sd quantizing them too saved
0.10 MiB and cost 5 dB PSNR (BENCHMARKS "Main job").

The rules of the newer DiTs (Sana, Lumina2, CogView4, AuraFlow, Chroma, Qwen-Image, Wan, LTX-Video, Hunyuan-DiT,
FLUX.2) live in :mod:`vqsuite.pipelines.rules_dit`, imported at the end of this module to register them.

Nothing here imports diffusers: rules only look at class names and module names.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from vqsuite.config import QuantConfig, QuantSpec, resolve_config
from vqsuite.errors import ConfigError, UserError
from vqsuite.nn.conv import FLOAT_CONV_TYPES

logger = logging.getLogger(__name__)

#: what a rule does to the layers it matches
Action = Literal["keep", "weight_only", "no_lowrank", "quantize"]
ACTIONS: tuple[str, ...] = ("keep", "weight_only", "no_lowrank", "quantize")


@dataclass(frozen=True)
class LayerRule:
    """One pattern of an architecture rule.

    Attributes:
        pattern: fnmatch pattern over the module name inside the denoiser (``"transformer_blocks.*.norm1.linear"``).
        action: ``"keep"`` (16-bit weights and activations), ``"weight_only"`` (the recipe's weight format,
            16-bit activations, rank 0), ``"no_lowrank"`` (the recipe with rank 0) or ``"quantize"`` (the recipe).
        role: what the layers are, for the report (``"adaLN modulation"``, ``"timestep embedder"``).
    """

    pattern: str
    action: Action
    role: str

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"action={self.action!r} must be one of {', '.join(ACTIONS)}")


@dataclass(frozen=True)
class SharedInput:
    """Linears that read the very same input tensor (q/k/v): they share one smoothing vector and one ``proj_down``.

    Attributes:
        parent: fnmatch pattern of the module holding them (``"transformer_blocks.*.attn"``).
        members: their names relative to the parent (``("to_q", "to_k", "to_v")``).

    SVDQuant calibration finds such groups by itself (it sees identical input tensors); the rule states them
    for paths without data, such as :func:`quantized_structure`'s memory accounting.
    """

    parent: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class ArchRule:
    """Which layers of one denoiser class are quantized how.

    Attributes:
        name: the denoiser class name it applies to (``type(model).__name__`` or a base class's name).
        layers: :class:`LayerRule` s in priority order; a layer matched by none gets the recipe.
        description: one line for the report.
        shared_inputs: :class:`SharedInput` groups (q/k/v projections and the like).
        dynamic: optional ``fn(model) -> list[LayerRule]`` appended after ``layers`` (rules that depend on the
            model's shapes, like the generic rule's first and last layer).
    """

    name: str
    layers: tuple[LayerRule, ...] = ()
    description: str = ""
    shared_inputs: tuple[SharedInput, ...] = ()
    dynamic: Callable[[nn.Module], list[LayerRule]] | None = field(default=None, compare=False)

    def shared_input_groups(self, model: nn.Module) -> list[list[str]]:
        """Full names of each group of layers of ``model`` that read one input (members that exist)."""
        names = {n for n, _ in model.named_modules()}
        groups = []
        for si in self.shared_inputs:
            for parent in sorted(n for n in names if fnmatch.fnmatchcase(n, si.parent)):
                members = [f"{parent}.{m}" for m in si.members if f"{parent}.{m}" in names]
                if len(members) > 1:
                    groups.append(members)
        return groups

    def layer_rules(self, model: nn.Module) -> list[LayerRule]:
        out = list(self.layers)
        if self.dynamic is not None:
            out.extend(self.dynamic(model))
        return out


ARCH_RULES: dict[str, ArchRule] = {}


def register_arch_rule(rule: ArchRule, *, overwrite: bool = False) -> None:
    """Teach ``quantize_pipeline`` a denoiser class (keyed by ``rule.name``)."""
    if rule.name in ARCH_RULES and not overwrite:
        raise UserError(f"an architecture rule for {rule.name!r} is already registered (pass overwrite=True)")
    ARCH_RULES[rule.name] = rule


def _keep(pattern: str, role: str) -> LayerRule:
    return LayerRule(pattern, "keep", role)


def _w4a16(pattern: str, role: str = "adaLN modulation") -> LayerRule:
    return LayerRule(pattern, "weight_only", role)


def _no_lowrank(pattern: str, role: str) -> LayerRule:
    return LayerRule(pattern, "no_lowrank", role)


_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


# ------------------------------------------------------------------------------ UNets
_UNET_COMMON = (
    _keep("conv_in", "input conv (first layer)"),
    _keep("conv_out", "output conv (last layer)"),
    _keep("time_embedding.*", "timestep embedder"),
    _keep("class_embedding*", "class embedder"),
    _keep("*.resnets.*.conv_shortcut", "resblock shortcut"),
    _keep("*.resnets.*.time_emb_proj", "resblock time projection"),
    _keep("*.downsamplers.*", "downsampler"),
    _keep("*.upsamplers.*", "upsampler"),
    LayerRule("*.resnets.*.conv[12]", "quantize", "resblock conv (W4A4 + conv low-rank branch)"),
)

register_arch_rule(
    ArchRule(
        "UNet2DConditionModel",
        _UNET_COMMON
        + (
            _keep("add_embedding.*", "added (text_time) embedder"),
            _keep("encoder_hid_proj*", "text embedder"),
            _keep("*.attentions.*.proj_in", "transformer proj_in"),
            _keep("*.attentions.*.proj_out", "transformer proj_out"),
        ),
        "SD 1.x/2.x, SDXL UNet: attention and feed-forward linears W4A4 (+ low rank), ResBlock convs W4A4",
        (
            SharedInput("*.transformer_blocks.*.attn1", _QKV),
            SharedInput("*.transformer_blocks.*.attn2", ("to_k", "to_v")),
        ),
    )
)
register_arch_rule(
    ArchRule(
        "UNet2DModel",
        _UNET_COMMON,
        "unconditional/class-conditional UNet (DDPM): attention linears W4A4 (+ low rank), ResBlock convs W4A4",
        (SharedInput("*.attentions.*", _QKV),),
    )
)

# ------------------------------------------------------------------------------ transformers
register_arch_rule(
    ArchRule(
        "FluxTransformer2DModel",
        (
            _keep("x_embedder", "input embedder (first layer)"),
            _keep("context_embedder", "text embedder"),
            _keep("time_text_embed.*", "timestep/guidance/pooled-text embedder"),
            _keep("norm_out.*", "final adaLN (output embed)"),
            _keep("proj_out", "output projection (last layer)"),
            _w4a16("transformer_blocks.*.norm1.linear"),
            _w4a16("transformer_blocks.*.norm1_context.linear"),
            _w4a16("single_transformer_blocks.*.norm.linear"),
        ),
        "FLUX.1: attention, MLP and single-block projections W4A4 (+ low rank); adaLN modulation W4A16",
        (
            SharedInput("transformer_blocks.*.attn", _QKV),
            SharedInput("transformer_blocks.*.attn", _ADD_QKV),
            SharedInput("single_transformer_blocks.*", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
        ),
    )
)
register_arch_rule(
    ArchRule(
        "SD3Transformer2DModel",
        (
            _keep("pos_embed.*", "patch embedder (first layer)"),
            _keep("context_embedder", "text embedder"),
            _keep("time_text_embed.*", "timestep/pooled-text embedder"),
            _keep("norm_out.*", "final adaLN (output embed)"),
            _keep("proj_out", "output projection (last layer)"),
            _w4a16("transformer_blocks.*.norm1.linear"),
            _w4a16("transformer_blocks.*.norm1_context.linear"),
        ),
        "SD3/SD3.5 MMDiT: attention and MLP linears W4A4 (+ low rank); adaLN modulation W4A16",
        (
            SharedInput("transformer_blocks.*.attn", _QKV),
            SharedInput("transformer_blocks.*.attn", _ADD_QKV),
            SharedInput("transformer_blocks.*.attn2", _QKV),
        ),
    )
)
register_arch_rule(
    ArchRule(
        "PixArtTransformer2DModel",
        (
            _keep("pos_embed.*", "patch embedder (first layer)"),
            _keep("adaln_single.*", "timestep embedder + shared adaLN-single modulation"),
            _keep("caption_projection.*", "caption (text) embedder"),
            _keep("proj_out", "output projection (last layer)"),
            # deepcompressor's PixArt config skips attn_add: the cross-attention K/V read the text stream
            _keep("transformer_blocks.*.attn2.to_k", "cross-attention key of the text stream (attn_add)"),
            _keep("transformer_blocks.*.attn2.to_v", "cross-attention value of the text stream (attn_add)"),
        ),
        "PixArt-α/Σ: self-attention, cross-attention Q/out and MLP W4A4 (+ low rank); text-stream K/V 16-bit",
        (SharedInput("transformer_blocks.*.attn1", _QKV),),
    )
)
register_arch_rule(
    ArchRule(
        "DiTTransformer2DModel",
        (
            _keep("pos_embed.*", "patch embedder (first layer)"),
            _keep("transformer_blocks.*.norm1.emb.*", "timestep/class embedder"),
            _keep("proj_out_1", "final adaLN modulation (output embed)"),
            _keep("proj_out_2", "output projection (last layer)"),
            _w4a16("transformer_blocks.*.norm1.linear"),
        ),
        "DiT (class-conditional): attention and MLP W4A4 (+ low rank); adaLN modulation W4A16",
        (SharedInput("transformer_blocks.*.attn1", _QKV),),
    )
)


# ------------------------------------------------------------------------------ generic fallback
def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if name and isinstance(w, torch.Tensor) and w.ndim >= 2 and not any(True for _ in m.children()):
            out.append((name, m))
    return out


def _generic_dynamic(model: nn.Module) -> list[LayerRule]:
    layers = [(n, m) for n, m in _weight_layers(model) if isinstance(m, (nn.Linear, *FLOAT_CONV_TYPES))]
    rules: list[LayerRule] = []
    if layers:
        rules.append(_keep(layers[0][0], "first layer (generic rule)"))
        rules.append(_keep(layers[-1][0], "last layer (generic rule)"))
    for name, m in layers:
        if isinstance(m, FLOAT_CONV_TYPES):
            if any(k != 1 for k in m.kernel_size):  # 1x1 in any dims (Conv1d/2d/3d)
                rules.append(_keep(name, "conv with a kernel larger than 1x1 (generic rule)"))
            else:
                rules.append(_no_lowrank(name, "1x1 conv (no low-rank branch)"))
    return rules


GENERIC_RULE = ArchRule(
    "generic",
    (
        _keep("*embed*", "embedder (name contains 'embed', generic rule)"),
        _keep("*time_proj*", "time projection (generic rule)"),
    ),
    "unknown denoiser: every nn.Linear and 1x1 conv with the recipe; first/last layers and embedders 16-bit",
    dynamic=_generic_dynamic,
)


def rule_for(model: nn.Module) -> tuple[ArchRule, bool]:
    """The rule for ``model`` (its class, then its base classes, by name) and whether it is the generic one."""
    for cls in type(model).__mro__:
        rule = ARCH_RULES.get(cls.__name__)
        if rule is not None:
            return rule, False
    return GENERIC_RULE, True


# ------------------------------------------------------------------------------ configs
def weight_only_spec(spec: QuantSpec) -> QuantSpec | None:
    """The recipe's weight format with 16-bit activations and no low-rank branch (W4A16 for a W4A4 recipe);
    ``None`` if the recipe does not quantize weights."""
    if spec.weight is None:
        return None
    return QuantSpec(
        weight=spec.weight,
        weight_group_size=spec.weight_group_size,
        scale_dtype=spec.scale_dtype,
        kernel=spec.kernel,
    )


def weight_only_config(config: str | QuantConfig | QuantSpec | dict) -> QuantConfig:
    """A weight-only RTN version of a recipe (for text encoders): W4A16 for 4-bit recipes, W8A16 for 8-bit ones."""
    cfg = resolve_config(config)
    spec = weight_only_spec(cfg.default) or QuantSpec(weight="int8")
    name = f"{cfg.name}-weight-only" if cfg.name else None
    return QuantConfig(
        default=spec,
        exclude=("*embed*", "*shared*", "*text_projection", "*lm_head"),
        name=name,
    )


def _spec_for(action: str, spec: QuantSpec) -> QuantSpec | None:
    if action == "keep":
        return None
    if action == "weight_only":
        return weight_only_spec(spec)
    if action == "no_lowrank":
        return spec.replace(rank=0) if spec.rank else spec
    return spec


def denoiser_config(
    model: nn.Module, config: str | QuantConfig | QuantSpec | dict, rule: ArchRule | None = None
) -> QuantConfig:
    """``config`` with ``rule`` (default: the model's) folded into its overrides.

    Order of the overrides (first match wins): the config's own overrides (a user's explicit choice), then the
    rule's patterns. A conv the recipe reaches takes its low-rank branch (``quantize_model``'s rank fallback sizes it
    to the conv's GEMM view). The config's name, method and options are kept.
    """
    cfg = resolve_config(config)
    if rule is None:
        rule, _ = rule_for(model)
    base = cfg.default
    overrides: list[tuple[str, QuantSpec | None]] = list(cfg.overrides)
    rules = rule.layer_rules(model)
    for lr in rules:
        overrides.append((lr.pattern, _spec_for(lr.action, base)))
    return replace(cfg, overrides=tuple(overrides))


def layer_role(rules: list[LayerRule], name: str) -> LayerRule | None:
    """The first of ``rules`` matching ``name``, or ``None``."""
    for lr in rules:
        if fnmatch.fnmatchcase(name, lr.pattern):
            return lr
    return None


# ------------------------------------------------------------------------------ structure only
@torch.no_grad()
def quantized_structure(
    model: nn.Module,
    config: str | QuantConfig | QuantSpec | dict,
    *,
    rule: ArchRule | None = None,
    apply_rule: bool = True,
) -> dict[str, Any]:
    """Swap ``model``'s layers for frozen quantized layers with *empty* storage, as ``quantize_model`` would.

    For memory accounting on the meta device (a FLUX.1-sized model built under ``torch.device("meta")``): no
    SVD, no quantization, no data; storage shapes and dtypes are exactly those of a real frozen layer, so
    :func:`vqsuite.module_nbytes` gives the real footprint. The layers are left uninitialised (``device`` of the
    float weights); load a checkpoint into them or discard the model. ``apply_rule`` folds the architecture rule
    (``rule`` or the model's) into ``config`` first, as ``quantize_pipeline`` does; the rule's shared-input groups
    then share one ``proj_down``, as after SVDQuant calibration. Returns ``{name: spec}`` of the swapped layers.
    """
    from vqsuite.nn import QConvBase, QLinear, QLinearLowRank
    from vqsuite.pipelines.layer_adapters import accept_extra_args, adapter_for
    from vqsuite.pipelines.modules import _rule_for, layer_spec, module_references, replace_module

    if rule is None:
        rule, _ = rule_for(model)
    cfg = denoiser_config(model, config, rule) if apply_rule else resolve_config(config)
    groups = rule.shared_input_groups(model) if apply_rule else []
    refs = module_references(model)
    swapped: dict[str, QuantSpec] = {}
    for name, m in _weight_layers(model):
        spec = cfg.spec_for(name)
        layer_rule, _ = _rule_for(m) if spec is not None else (None, None)  # plain types and adapted subclasses
        if layer_rule is None:
            continue
        reason_fn, build = layer_rule
        spec, why, _ = layer_spec(m, spec, reason_fn, name=name)  # the fallbacks quantize_model applies
        if why is not None:
            continue
        w = m.weight
        if type(m) is nn.Linear:
            cls = QLinearLowRank if spec.rank > 0 else QLinear
            q = cls(m.in_features, m.out_features, m.bias is not None, spec, device=w.device, dtype=w.dtype)
        elif isinstance(m, FLOAT_CONV_TYPES):
            q = build(m, spec)  # from_float copies meta -> meta, a no-op
            assert isinstance(q, QConvBase)
        else:  # a layer type registered by someone else: build it the ordinary way
            q = build(m, spec)
        q.layer_name = name
        q.freeze_empty(w.device)
        accept_extra_args(q, adapter_for(m))
        replace_module(model, refs, m, q)
        swapped[name] = spec
    for group in groups:
        layers = [model.get_submodule(n) for n in group if n in swapped]
        layers = [q for q in layers if isinstance(q, QLinearLowRank) and q.rank > 0]
        for q in layers[1:]:
            if q.spec == layers[0].spec and q.proj_down.shape == layers[0].proj_down.shape:
                q.proj_down = layers[0].proj_down
    return swapped


# ------------------------------------------------------------------------------ kept layers at 8 bits
#: the role text that marks a rule's first and last layers ("input conv (first layer)", ...)
IO_ROLE_MARKS = ("first layer", "last layer")
#: ``kept_layers_config``'s group along K for the first/last layers: SDNQ's INT8 conv scales are per output channel
#: and kernel tap, which is what keeps its quantized ``conv_in``/``conv_out`` close to float (BENCHMARKS.md,
#: "Pareto front against SDNQ")
KEPT_IO_GROUP = 4


def kept_layers_config(
    model: nn.Module,
    config: str | QuantConfig | QuantSpec | dict,
    *,
    weight: str = "int8",
    io_group: int | None = KEPT_IO_GROUP,
    rule: ArchRule | None = None,
) -> QuantConfig:
    """``config`` plus weight-only overrides for the layers the architecture rule keeps 16-bit.

    Every layer the rule keeps (embedders, first/last layers, shortcuts, samplers, ...) gets ``weight`` per output
    channel and 16-bit activations; the first and last layers (by their rule role) get groups of ``io_group`` along
    K instead (``None``: per channel). On the trained mini-sd this turns W8A16 from 1.61 MiB / 50.9 dB into
    1.10 MiB / 47.9 dB PSNR vs FP32, above SDNQ's INT8 of every layer (1.18 MiB / 47.7 dB). The overrides come
    before ``config``'s own, so ``quantize_pipeline`` folds the rule in after them and they win.
    """
    cfg = resolve_config(config)
    if rule is None:
        rule, _ = rule_for(model)
    folded = denoiser_config(model, cfg, rule)
    rules = rule.layer_rules(model)
    plain = QuantSpec(weight=weight)
    grouped = QuantSpec(weight=weight, weight_group_size=io_group) if io_group else plain
    extra: list[tuple[str, QuantSpec | None]] = []
    for name, _ in _weight_layers(model):
        if folded.spec_for(name) is not None:
            continue
        role = getattr(layer_role(rules, name), "role", "")
        exact = "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)  # an fnmatch pattern of this name only
        extra.append((exact, grouped if any(m in role for m in IO_ROLE_MARKS) else plain))
    name = f"{cfg.name}+kept-{weight}" if cfg.name else None
    return replace(cfg, overrides=tuple(extra) + tuple(cfg.overrides), name=name)


# the newer DiTs live in their own module; importing it registers their rules
from vqsuite.pipelines import rules_dit as _rules_dit  # noqa: E402, F401
