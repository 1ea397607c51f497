"""LoRA adapters on a quantized pipeline: ``pipe.load_lora_weights(...)`` after :func:`vqsuite.quantize_pipeline`.

Route. diffusers reads and converts every LoRA file format (diffusers, kohya, PEFT: ``lora_state_dict`` and the
``convert_*`` functions) and injects the adapters with peft (``load_lora_adapter`` -> ``peft.inject_adapter_in_model``).
peft picks a LoRA layer per target module through dispatchers; none knows vqsuite's quantized layers, but a
``LoraConfig`` can carry a custom-module mapping (``LoraConfig._register_custom_module``) that peft tries first. The
config is built inside diffusers' ``load_lora_adapter``, so :func:`attach_lora_support` gives each quantized
pipeline (and each quantized component) its own ``load_lora_weights`` / ``load_lora_adapter`` that run diffusers'
unchanged method while ``peft.inject_adapter_in_model`` is wrapped to register :data:`QUANT_LORA_LAYERS` on the
config it receives (and to refuse, by name, a LoRA target that is not a module of the model). Everything after
injection is stock diffusers/peft: ``set_adapters(names, weights)``, ``disable_lora``/``enable_lora``,
``delete_adapters``, ``unload_lora_weights``, several adapters at once, kohya conv LoRAs. The other routes were
worse: a global patch of peft's dispatch changes float models too; re-implementing ``load_lora_adapter`` forks
~150 lines of diffusers (offloading, hotswap, metadata); fusing into the weights first is impossible once frozen.

Layers (peft's LoRA layer conventions, so peft's bookkeeping, state-dict names and scaling rules apply):

* :class:`LoraQLinearLowRank` (on :class:`~vqsuite.nn.QLinearLowRank`, SVDQuant): the adapters join the 16-bit
  branch, as nunchaku does. The branch sees ``x/λ``, so adapter ``i`` (``A_i: [r_i, K]``, ``B_i: [N, r_i]``,
  scaling ``s_i``) adds the columns ``diag(λ) A_i^T`` to ``proj_down [K, r]`` and ``s_i B_i`` to ``proj_up [N, r]``;
  the layer then runs one branch of rank ``r + Σ r_i`` in its own kernel path (reference, CPU family, Triton up to
  the fused rank limit) through :meth:`~vqsuite.nn.QLinear.set_branch_override`. The stored ``proj_down/proj_up``
  never change: the concatenation is rebuilt (and cached) from the adapters' own tensors and scalings, so a
  strength change, disable or unload gives back exactly the original branch.
* :class:`LoraQLinear` (on :class:`~vqsuite.nn.QLinear`): a 16-bit side branch ``Q(x) + s·B(A(x))`` (peft's own
  ``lora.Linear`` forward).
* :class:`LoraQConv` (on ``QConv1d/2d/3d``): peft's conv LoRA, a ``k×k`` conv to ``r`` channels (the base layer's
  kernel size, stride, padding) then a ``1×1`` conv, as a float side branch.

Dropout in training, DoRA-style variants and per-sample ``adapter_names`` fall back to the side-branch math.
Merging (``fuse_lora``) into a quantized weight is refused. PixArt pipelines and models have no LoRA loader in
diffusers 0.42: :func:`inject_lora` loads a PEFT-format LoRA into such a denoiser (diffusers' config inference, the
same layers). Saving: :func:`lora_checkpoint` (each adapter's own
tensors in diffusers' PEFT key format, its config and every layer's scaling) and :func:`restore_lora_checkpoint`;
see :mod:`vqsuite.pipelines.diffusers_io`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer, _ConvNd
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from vqsuite.errors import UserError
from vqsuite.nn import QLinear, QLinearLowRank, QuantLayer
from vqsuite.nn.conv import QConvNd

logger = logging.getLogger(__name__)

LORA_FORMAT = "vqsuite-lora"
LORA_VERSION = 1


class _QuantLoraMixin:
    """What peft reads from a base layer, answered from a quantized layer without dequantizing its weight."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        if isinstance(module, QConvNd):
            return module.in_channels, module.out_channels
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device | None, torch.dtype]:
        t = next(iter(base_layer.buffers()), None)
        t = t if t is not None else next(iter(base_layer.parameters()), None)
        return (None if t is None else t.device), base_layer.weight_dtype

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise UserError(
            f"cannot fuse a LoRA into the quantized layer {self.get_base_layer().layer_name or type(self).__name__}: "
            "its weight is packed; the adapter runs beside it (set_adapters/unload_lora_weights work)"
        )

    def unmerge(self) -> None:
        return None

    def _check_supported(self, config: Any) -> None:
        name = self.get_base_layer().layer_name or type(self.get_base_layer()).__name__
        if getattr(config, "use_dora", False):
            raise UserError(f"DoRA needs the float weight; {name} is quantized (use a plain LoRA)")


class LoraQLinear(_QuantLoraMixin, _PeftLoraLinear):
    """peft LoRA on a :class:`~vqsuite.nn.QLinear`: ``y = Q(x) + Σ s_i · B_i(A_i(x))`` (16-bit side branch)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1, **kw):
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self._check_supported(config)
        self.fan_in_fan_out = False
        self.is_target_conv_1d_layer = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kw)


class LoraQLinearLowRank(LoraQLinear):
    """peft LoRA on a :class:`~vqsuite.nn.QLinearLowRank`: the active adapters are concatenated onto the 16-bit
    branch, ``proj_down' = [proj_down | diag(λ) A_1^T | ...]: [K, r + Σ r_i]`` and
    ``proj_up' = [proj_up | s_1 B_1 | ...]: [N, r + Σ r_i]``, and the base layer runs that one branch."""

    def _fused_adapters(self, kwargs: dict[str, Any]) -> list[str] | None:
        """The adapters to concatenate now, or ``None`` when peft's side-branch forward must run instead."""
        if self.merged or kwargs.get("adapter_names") is not None:
            return None
        if self.disable_adapters:
            return []
        names = [a for a in self.active_adapters if a in self.lora_A]
        for a in names:
            drop = self.lora_dropout[a]
            if a in self.lora_variant or self.lora_bias.get(a) or (self.training and not isinstance(drop, nn.Identity)):
                return None
        return names

    def concatenated_branch(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(proj_down' [K, r + Σ r_i], proj_up' [N, r + Σ r_i])`` in the layer's dtype, cached on the tensors'
        identities and versions and the scalings (recomputed without caching when a gradient is wanted)."""
        base: QLinearLowRank = self.get_base_layer()
        down0, up0, lam = base._parameters.get("proj_down"), base._parameters.get("proj_up"), base.smooth
        ab = [(self.lora_A[a].weight, self.lora_B[a].weight, float(self.scaling[a])) for a in names]
        ver = tuple((id(t), t._version) for t in (down0, up0, lam) if t is not None)
        key = (ver, tuple((id(a_), a_._version, id(b_), b_._version, s) for a_, b_, s in ab))
        grad = torch.is_grad_enabled() and any(t.requires_grad for a_, b_, _ in ab for t in (a_, b_))
        cached = self.__dict__.get("_vq_branch")
        if not grad and cached is not None and cached[0] == key:
            return cached[1]
        dtype = base.weight_dtype
        lam64 = lam.detach().double() if not grad else lam.double()
        downs = [] if down0 is None else [down0]
        ups = [] if up0 is None else [up0]
        for a_, b_, s in ab:
            downs.append((a_.double().t() * lam64[:, None]).to(dtype))
            ups.append((b_.double() * s).to(dtype))
        branch = (torch.cat(downs, 1), torch.cat(ups, 1))
        if not grad:
            branch = (branch[0].detach(), branch[1].detach())
            self.__dict__["_vq_branch"] = (key, branch)
        return branch

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: ``[..., K]`` -> ``[..., N]``: the quantized layer with its branch lengthened by the active adapters."""
        names = self._fused_adapters(kwargs)
        if names is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        if not names:
            return base(x, *args, **kwargs)
        base.set_branch_override(self.concatenated_branch(names))
        try:
            return base(x, *args, **kwargs)
        finally:
            base.set_branch_override(None)


class LoraQConv(_QuantLoraMixin, _ConvNd):
    """peft conv LoRA on a quantized ``QConv1d/2d/3d``: ``y = Q(x) + Σ s_i · conv1x1_B(convkxk_A(x))`` (float)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1, **kw):
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self._check_supported(config)
        if r % base_layer.groups != 0:
            raise UserError(f"LoRA rank {r} on {base_layer.layer_name}: not a multiple of groups={base_layer.groups}")
        self._active_adapter = adapter_name
        self._kernel_dim = base_layer.dims + 2
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        """peft's conv LoRA layout with float ``nn.ConvNd`` factors (peft would build them of the base's class)."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        base = self.get_base_layer()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[base.dims]
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        drop = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p=drop) if drop > 0.0 else nn.Identity()
        one = (1,) * base.dims
        self.lora_A[adapter_name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[adapter_name] = conv(r, self.out_features, one, one, groups=base.groups, bias=config.lora_bias)
        self.lora_bias[adapter_name] = config.lora_bias
        self.scaling[adapter_name] = lora_alpha / (r**0.5 if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        if config.init_lora_weights:
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)


#: quantized layer class -> its peft LoRA layer (first match wins: subclasses first)
QUANT_LORA_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    QLinearLowRank: LoraQLinearLowRank,
    QLinear: LoraQLinear,
    QConvNd: LoraQConv,
}


def _lora_targets(state_dict: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(".lora_")[0] for k in state_dict if ".lora_" in k}


def _check_targets(model: nn.Module, state_dict: dict[str, torch.Tensor] | None) -> None:
    """Every module a LoRA targets must exist: one clear error naming the first missing ones."""
    if not state_dict:
        return
    modules = dict(model.named_modules())
    missing = sorted(t for t in _lora_targets(state_dict) if t not in modules)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(
            f"LoRA targets {', '.join(repr(m) for m in missing[:3])}{more}, not a module of {type(model).__name__} "
            "(a LoRA for another architecture?)"
        )


@contextlib.contextmanager
def quantized_lora_dispatch() -> Iterator[None]:
    """While active, every ``peft.inject_adapter_in_model`` call registers :data:`QUANT_LORA_LAYERS` on its
    ``LoraConfig`` and checks that the LoRA's targets exist (diffusers imports the function inside its loaders)."""
    import peft

    original = peft.inject_adapter_in_model
    if getattr(original, "_vqsuite_wrapped", False):  # nested (pipeline -> component): already in place
        yield
        return

    @functools.wraps(original)
    def inject(peft_config: Any, model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        if hasattr(peft_config, "_register_custom_module"):
            peft_config._register_custom_module(QUANT_LORA_LAYERS)
        _check_targets(model, kwargs.get("state_dict"))
        return original(peft_config, model, *args, **kwargs)

    inject._vqsuite_wrapped = True
    peft.inject_adapter_in_model = inject
    try:
        yield
    finally:
        peft.inject_adapter_in_model = original


def _within_dispatch(fn: Any) -> Any:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with quantized_lora_dispatch():
            return fn(*args, **kwargs)

    call._vqsuite_lora = True
    return call


def _is_quantized(module: Any) -> bool:
    return isinstance(module, nn.Module) and any(isinstance(m, QuantLayer) for m in module.modules())


def _expand_skipping_quantized(original: Any) -> Any:
    """FLUX-style loaders widen a LoRA's ``lora_A`` to the base weight's input width (Control LoRAs), reading
    ``{module}.weight`` from the state dict, which a quantized layer does not have (``qweight``). Entries on quantized
    layers pass through unchanged when they fit and are refused by name when they would need the widening (a packed
    weight cannot grow); the rest go to diffusers' own function."""

    @functools.wraps(original)
    def expand(transformer: nn.Module, lora_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = f"{getattr(original.__self__, 'transformer_name', 'transformer')}."
        modules = dict(transformer.named_modules())
        kept: dict[str, torch.Tensor] = {}
        rest: dict[str, torch.Tensor] = {}
        for key, value in lora_state_dict.items():
            module = modules.get(key.removeprefix(prefix).split(".lora_")[0])
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not isinstance(base, QuantLayer):
                rest[key] = value
                continue
            width = getattr(base, "in_features", getattr(base, "in_channels", None))
            if key.endswith(".lora_A.weight") and value.shape[1] != width:
                raise UserError(
                    f"LoRA {key}: lora_A has {value.shape[1]} input features, the quantized layer {width}; widening "
                    "a quantized layer's input (Control LoRA) is not supported"
                )
            kept[key] = value
        out = original(transformer=transformer, lora_state_dict=rest) if rest else {}
        out.update(kept)
        return out

    expand._vqsuite_lora = True
    return expand


def attach_lora_support(pipe: Any) -> Any:
    """Make ``pipe.load_lora_weights`` (and each quantized component's ``load_lora_adapter``) accept LoRAs on the
    quantized layers. Called by :func:`vqsuite.quantize_pipeline` and the pipeline loader; idempotent."""
    for obj in [pipe, *(c for c in getattr(pipe, "components", {}).values() if _is_quantized(c))]:
        for name in ("load_lora_weights", "load_lora_adapter"):
            fn = getattr(obj, name, None)
            if fn is not None and not getattr(fn, "_vqsuite_lora", False):
                object.__setattr__(obj, name, _within_dispatch(fn))
    fn = getattr(pipe, "_maybe_expand_lora_state_dict", None)
    if fn is not None and not getattr(fn, "_vqsuite_lora", False):
        object.__setattr__(pipe, "_maybe_expand_lora_state_dict", _expand_skipping_quantized(fn))
    return pipe


def inject_lora(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    *,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """Load a PEFT-format LoRA (``{module}.lora_A.weight [r, K]``, ``{module}.lora_B.weight [N, r]``) into ``model``,
    for a denoiser whose diffusers class has no LoRA loader (PixArt in diffusers 0.42): diffusers' own
    ``get_peft_kwargs`` (rank per module from ``lora_B``, ``lora_alpha = r``) or the saved ``config``, then peft's
    injection with :data:`QUANT_LORA_LAYERS`. Afterwards peft's layer API applies (``set_adapter``, ``scaling``,
    ``diffusers.utils.peft_utils.set_weights_and_activate_adapters``)."""
    from peft import LoraConfig, set_peft_model_state_dict

    if config is None:
        from diffusers.utils.peft_utils import get_peft_kwargs

        rank = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
        if not rank:
            raise UserError(f"LoRA {adapter_name!r}: no '<module>.lora_B.weight' entry (not a PEFT-format LoRA)")
        config = get_peft_kwargs(rank, None, state_dict, model_state_dict=model.state_dict(), adapter_name=adapter_name)
    import peft

    with quantized_lora_dispatch():
        peft.inject_adapter_in_model(LoraConfig(**config), model, adapter_name=adapter_name, state_dict=state_dict)
    set_peft_model_state_dict(model, state_dict, adapter_name)
    return model


# --------------------------------------------------------------------------- checkpoint
def _tuner_layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer")}


def _json_config(config: Any) -> dict[str, Any]:
    d = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items() if not k.startswith("_")}


def lora_checkpoint(pipe: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The LoRA adapters on ``pipe``'s quantized components, separable: ``(tensors, meta)`` or ``None`` if none.

    tensors: ``"{adapter}/{component}.{module}.lora_A.weight"`` etc. (diffusers' PEFT key format, one group per
    adapter); meta: per component and adapter the ``LoraConfig`` as a dict, the active adapters, whether adapters
    are enabled, and every layer's ``scaling`` per adapter (the strengths, exactly).
    """
    from peft.utils import get_peft_model_state_dict

    tensors: dict[str, torch.Tensor] = {}
    comps: dict[str, Any] = {}
    for cname, comp in getattr(pipe, "components", {}).items():
        if not _is_quantized(comp):
            if isinstance(comp, nn.Module) and _tuner_layers(comp):
                raise UserError(
                    f"{cname} (not quantized) carries LoRA layers its own save_pretrained would not keep separable; "
                    "unload_lora_weights() (after fuse_lora() to keep their effect) before saving"
                )
            continue
        layers = _tuner_layers(comp)
        if not layers:
            continue
        if any(m.merged for m in layers.values()):
            raise UserError(f"{cname}: a LoRA is fused into its weights; unfuse_lora() before saving")
        configs = dict(getattr(comp, "peft_config", {}) or {})
        for adapter in configs:
            sd = get_peft_model_state_dict(comp, adapter_name=adapter)
            for k, v in sd.items():
                tensors[f"{adapter}/{cname}.{k}"] = v.detach().contiguous()
        first = next(iter(layers.values()))
        comps[cname] = {
            "configs": {a: _json_config(c) for a, c in configs.items()},
            "active": list(first.active_adapters),
            "enabled": not first.disable_adapters,
            "scaling": {n: {a: float(s) for a, s in m.scaling.items()} for n, m in layers.items()},
        }
    if not comps:
        return None
    return tensors, {"format": LORA_FORMAT, "version": LORA_VERSION, "components": comps}


@contextlib.contextmanager
def lora_detached(pipe: Any) -> Iterator[None]:
    """Take the peft LoRA layers out of ``pipe``'s quantized components (each base layer back in its place) and
    put the same objects back on exit: the quantized checkpoint is written without them."""
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for comp in getattr(pipe, "components", {}).values():
        if not _is_quantized(comp):
            continue
        for name, layer in _tuner_layers(comp).items():
            parent_name, _, child = name.rpartition(".")
            parent = comp.get_submodule(parent_name) if parent_name else comp
            swaps.append((parent, child, layer))
    try:
        for parent, child, layer in swaps:
            setattr(parent, child, layer.get_base_layer())
        yield
    finally:
        for parent, child, layer in swaps:
            setattr(parent, child, layer)


def restore_lora_checkpoint(pipe: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> None:
    """Load adapters saved by :func:`lora_checkpoint` onto ``pipe`` (diffusers' ``load_lora_adapter`` with the
    saved config), then set the saved active adapters, enabled state and every layer's scaling."""
    if meta.get("format") != LORA_FORMAT or meta.get("version") != LORA_VERSION:
        raise UserError(f"{where}: not a {LORA_FORMAT} v{LORA_VERSION} file")
    attach_lora_support(pipe)
    comps = pipe.components
    for cname, entry in meta["components"].items():
        comp = comps.get(cname)
        if not isinstance(comp, nn.Module):
            raise UserError(f"{where}: LoRA for component {cname!r}, which the pipeline lacks")
        for adapter, config in entry["configs"].items():
            prefix = f"{adapter}/{cname}."
            sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if hasattr(comp, "load_lora_adapter"):
                comp.load_lora_adapter(sd, prefix=None, adapter_name=adapter, metadata=dict(config))
            else:  # a denoiser diffusers has no LoRA loader for (PixArt)
                inject_lora(comp, sd, adapter, config=dict(config))
        layers = _tuner_layers(comp)
        for name, scalings in entry["scaling"].items():
            if name not in layers:
                raise UserError(f"{where}: LoRA layer {cname}.{name} was not rebuilt")
            layers[name].scaling.update(scalings)
        for layer in layers.values():
            layer.set_adapter(entry["active"])
            layer.enable_adapters(bool(entry["enabled"]))
