"""Saving and loading quantized models: a folder with ``model.safetensors`` and ``vqsuite_config.json``.

The JSON records, for every quantized layer, its class, constructor arguments, spec and state, so
``load_quantized`` can rebuild the layers on the meta device and load the packed tensors into them with a
strict key, shape and dtype check. Saving writes into a temporary folder beside the target and renames it into
place, so a crash never leaves a half-written checkpoint and never damages an existing one.

Loading is safe by construction: only JSON and safetensors are read (no pickle, no code from the folder), both
files must lie inside the folder (no symlink out), every JSON field is validated before use
(:mod:`vqsuite.pipelines.schema`), the float architecture comes from an allow-list of sources (timm, the zoo),
and a floating tensor holding NaN or Inf is refused. Each refusal is one :class:`CheckpointError` line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqsuite.calibrators.timestep import attach_step_tracker_if_needed
from vqsuite.config import CONFIG_VERSION, QuantConfig, QuantSpec
from vqsuite.fileio import (  # noqa: F401 - re-exported: atomic saving lives in vqsuite.fileio
    _fsync_dir,
    atomic_folder,
    recover_interrupted_save,
    write_json,
)
from vqsuite.nn import CONV_TWINS, FLOAT_LOWRANK_CONV_TWINS, QConv2dSame, QLinear, QLinearLowRank, QuantLayer
from vqsuite.pipelines.errors import CheckpointError, first_line, name_repr, read_json_file, short_repr
from vqsuite.pipelines.folder import contained_file
from vqsuite.pipelines.layer_adapters import accept_extra_args, adapter_for
from vqsuite.pipelines.modules import module_references, replace_module
from vqsuite.pipelines.schema import FLOAT_DTYPES, validate_checkpoint_meta

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vqsuite-quantized"
CHECKPOINT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "vqsuite_config.json"

#: quantized layer classes a checkpoint may name, and the float type each replaces
LAYER_CLASSES: dict[str, tuple[type[QuantLayer], type[nn.Module]]] = {
    "QLinear": (QLinear, nn.Linear),
    "QLinearLowRank": (QLinearLowRank, nn.Linear),
    **{q.__name__: (q, t) for t, q in CONV_TWINS.items()},
    **{q.__name__: (q, t) for t, q in FLOAT_LOWRANK_CONV_TWINS.items()},  # SVDQuant convs (smoothing + branch)
    "QConv2dSame": (QConv2dSame, nn.Conv2d),  # timm Conv2dSame & co (layer adapters)
}


#: marker file of a quantized diffusers pipeline folder (see ``vqsuite.pipelines.diffusers_io``)
PIPELINE_META_NAME = "vqsuite_pipeline.json"


def _is_diffusion_pipeline(obj: Any) -> bool:
    """A diffusers ``DiffusionPipeline``, recognised by class name so diffusers is never imported here."""
    return any(c.__name__ == "DiffusionPipeline" and c.__module__.startswith("diffusers") for c in type(obj).__mro__)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_source(model: nn.Module) -> dict[str, Any] | None:
    """How to rebuild the float architecture without pickle, when the model says (timm models do)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture") and type(model).__module__.startswith("timm."):
        kwargs = {}
        if isinstance(getattr(model, "num_classes", None), int):
            kwargs["num_classes"] = model.num_classes
        return {"library": "timm", "name": cfg["architecture"], "kwargs": kwargs}
    return None


def _state_for_saving(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict with shared tensors (tied weights) stored once; returns (tensors, alias -> canonical)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} is on the meta device; nothing to save")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def save_quantized(model: nn.Module, path: str | os.PathLike, *, model_source: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (quantized by :func:`vqsuite.quantize_model`) to the folder ``path``.

    ``model_source`` (e.g. ``{"library": "timm", "name": "vit_small_patch16_224", "kwargs": {}}``) lets
    ``load_quantized(path)`` rebuild the architecture without a model; timm models record it themselves.
    An existing checkpoint folder at ``path`` is replaced atomically; any other existing path is refused.
    A diffusers pipeline (quantized by :func:`vqsuite.quantize_pipeline`) is saved as a pipeline folder
    (:func:`vqsuite.pipelines.diffusers_io.save_quantized_pipeline`).
    """
    from safetensors.torch import save_file

    if _is_diffusion_pipeline(model):
        from vqsuite.pipelines.diffusers_io import save_quantized_pipeline

        return save_quantized_pipeline(model, path)
    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / CONFIG_NAME).exists() or not any(path.iterdir()))):
        raise CheckpointError(f"{path} exists and is not a vqsuite checkpoint folder; refusing to overwrite it")
    layers: dict[str, Any] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            layers[name] = {
                "class": type(m).__name__,
                "args": m.ctor_kwargs(),
                "spec": m.spec.to_dict(),
                "frozen": m.frozen,
                "weight_dtype": _dtype_name(m.weight_dtype),
            }
    if not layers:
        raise CheckpointError("the model has no quantized layers; quantize it with vqsuite.quantize_model first")
    tensors, aliases = _state_for_saving(model)
    cfg = getattr(model, "vqsuite_config", None)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "checkpoint_version": CHECKPOINT_VERSION,
        "config_version": CONFIG_VERSION,
        "vqsuite_version": _vqsuite_version(),
        "config": cfg.to_dict() if isinstance(cfg, QuantConfig) else None,
        "model_source": model_source or _model_source(model),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "layers": layers,
        "aliases": aliases,
    }
    with atomic_folder(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": CHECKPOINT_FORMAT})
        write_json(tmp / CONFIG_NAME, meta)
    logger.info("saved %d quantized layers to %s", len(layers), path)
    return path


def _vqsuite_version() -> str:
    from vqsuite import __version__

    return __version__


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's JSON, with every field validated (:func:`vqsuite.pipelines.schema.validate_checkpoint_meta`);
    ``CheckpointError`` with one readable line otherwise. Both files must lie inside the folder."""
    recover_interrupted_save(path)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a vqsuite checkpoint is a folder with {CONFIG_NAME}")
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        if not contained_file(path, fname, "it").is_file():
            raise CheckpointError(f"{path} has no {fname}: not a vqsuite checkpoint (or an incomplete one)")
    meta = read_json_file(path / CONFIG_NAME)
    validate_checkpoint_meta(
        meta, path / CONFIG_NAME, checkpoint_format=CHECKPOINT_FORMAT, checkpoint_version=CHECKPOINT_VERSION
    )
    return meta


def _build_model(meta: dict[str, Any]) -> nn.Module:
    """The float architecture from the checkpoint's (validated) ``model_source``: a timm model by its registered
    name, or a zoo model; nothing else is ever imported or built from a checkpoint's description."""
    src = meta.get("model_source")
    if not src:
        raise CheckpointError(
            f"the checkpoint does not record how to build {(meta.get('model_class') or 'the model')[:120]}; "
            "pass the float model: load_quantized(path, model=...)"
        )
    name = src["name"]
    if src["library"] == "timm":
        import timm

        if not timm.is_model(name):
            raise CheckpointError(f"cannot build timm model {short_repr(name)}: timm has no such architecture")
        try:
            # eval: a checkpoint loaded without a model is for inference (train-mode BN would use batch stats)
            return timm.create_model(name, pretrained=False, **src.get("kwargs", {})).eval()
        except Exception as e:  # bad kwargs: one readable line
            raise CheckpointError(f"cannot build timm model {short_repr(name)}: {first_line(e)}") from None
    from vqsuite import zoo

    if name not in zoo.list():
        raise CheckpointError(f"cannot build zoo model {short_repr(name)}: no such zoo model")
    try:
        return zoo.load(name).model.eval()
    except (KeyError, zoo.AssetMissingError) as e:  # missing package: one readable line
        raise CheckpointError(f"cannot build zoo model {short_repr(name)}: {first_line(e)}") from None


def _restore_method_modules(model: nn.Module, config: QuantConfig | None, path: Path) -> Callable[[], None]:
    """Modules a method adds beside the quantized layers (``vit-ptq``: activation quantizer wrappers), put back on
    the float model before its state is loaded; returns an undo for a failed load."""
    if config is None or config.method not in ("vit-ptq", "qat"):
        return lambda: None
    if config.method == "qat":  # a frozen QAT model: activation quantizers and QAT attention around the layers
        from vqsuite.finetune.freeze import restore_qat as restore
    else:
        from vqsuite.calibrators.vit_ptq import restore_vit_ptq as restore

    try:
        return restore(model, config.options)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _rebuild_layer(model: nn.Module, name: str, entry: dict[str, Any], refs: dict[int, list[str]]) -> nn.Module:
    """Swap the model's layer ``name`` (everywhere it is used) for an empty quantized one; returns the old one."""
    try:
        cls, float_type = LAYER_CLASSES[entry["class"]]
    except (KeyError, TypeError):
        cls_name = short_repr(entry.get("class"))
        raise CheckpointError(f"layer {name_repr(name)}: unknown quantized class {cls_name}") from None
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"layer {name_repr(name)} of the checkpoint does not exist in the model") from None
    adapter = adapter_for(current)  # an adapted class (MotionLinear, ...) stands for its adapter's base type
    if not isinstance(current, (float_type, cls)) and not (adapter and issubclass(adapter.base, float_type)):
        raise CheckpointError(
            f"layer {name_repr(name)} is a {type(current).__name__} in the model but a {float_type.__name__} "
            "in the checkpoint"
        )
    try:  # the entry was validated (schema.validate_checkpoint_meta); what remains are cross-field checks
        spec = QuantSpec.from_dict(entry["spec"])
        dtype = FLOAT_DTYPES[entry["weight_dtype"]]
        q = cls(**entry["args"], spec=spec, device="meta", dtype=dtype)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"layer {name_repr(name)}: invalid entry in checkpoint ({first_line(e)})") from None
    q.layer_name = name
    q.train(current.training)
    accept_extra_args(q, adapter)
    if entry.get("frozen", True):
        q.freeze_empty("meta")
    replace_module(model, refs, current, q)
    return current


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias hold the very Parameter/buffer of its canonical name again (a tie, not two Parameters
    on one storage, which ``.to()`` would split into two copies)."""
    for alias, canonical in aliases.items():
        a_mod, _, a_attr = alias.rpartition(".")
        c_mod, _, c_attr = canonical.rpartition(".")
        a, c = model.get_submodule(a_mod), model.get_submodule(c_mod)
        for table in ("_parameters", "_buffers"):
            if c_attr in getattr(c, table) and a_attr in getattr(a, table):
                getattr(a, table)[a_attr] = getattr(c, table)[c_attr]


#: buffers where NaN is a stored value, not damage: a per-step static scale slot never seen in calibration
#: (``QuantLayer.set_act_scale_table``); Inf is refused there too
_NAN_ALLOWED = frozenset({"act_scale_steps", "act_scale_t"})


def check_finite(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse a checkpoint whose floating tensors (scales, smoothing, low-rank factors, biases, float weights)
    hold NaN or Inf: ``CheckpointError`` naming the first such tensor. Saving never checks (a model with NaN
    state still saves, so it can be inspected); loading does."""
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        values = t if t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else t.float()
        if name.rpartition(".")[2] in _NAN_ALLOWED:
            bad = bool(torch.isinf(values).any())
        else:
            bad = not bool(torch.isfinite(values).all())
        if bad:
            raise CheckpointError(
                f"{file}: tensor {name_repr(name)} holds NaN or Inf values; refusing a damaged checkpoint"
            )


#: the E8M0 code that means NaN (OCP MX v1.0): a stored MXFP4 block scale never holds it
E8M0_NAN_CODE = 0xFF


def check_e8m0_scales(tensors: dict[str, torch.Tensor], layers: dict[str, Any], file: Path) -> None:
    """Refuse a checkpoint whose E8M0 block scales (``uint8`` biased exponents, MXFP4) hold the NaN code 0xFF:
    they are integers, so :func:`check_finite` cannot see them. ``layers`` is the checkpoint's layer table."""
    from vqsuite.formats import get_format

    for name, entry in layers.items():
        weight = (entry.get("spec") or {}).get("weight")
        if not isinstance(weight, str) or get_format(weight).scale_kind != "e8m0":
            continue
        scales = tensors.get(f"{name}.wscales")
        if scales is not None and scales.dtype == torch.uint8 and bool((scales == E8M0_NAN_CODE).any()):
            raise CheckpointError(
                f"{file}: tensor {name_repr(name + '.wscales')} holds the E8M0 NaN code 0xFF; refusing a damaged "
                "checkpoint"
            )


def tensor_file_reason(e: BaseException) -> str:
    """Why a safetensors file could not be read, without quoting the file (safetensors' messages quote header
    bytes after a backtick): ``header too large``, ``invalid JSON in header``, an OS error."""
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    text = first_line(e, 120).removeprefix("Error while deserializing header: ")
    for quote in ("`", "'", '"', ":"):
        text = text.split(quote, 1)[0]
    return text.strip() or type(e).__name__


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensor(s), first {name_repr(missing[0])}")
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s), first {name_repr(extra[0])}")
    for k, t in expected.items():
        got = tensors[k]
        if tuple(got.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{path}: tensor {k!r} has shape {tuple(got.shape)}, the model expects {tuple(t.shape)}"
            )
        if got.dtype != t.dtype:
            raise CheckpointError(f"{path}: tensor {k!r} has dtype {got.dtype}, the model expects {t.dtype}")


def load_quantized(
    path: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a quantized model saved by :func:`save_quantized`.

    ``model`` is the float architecture (weights are replaced, so random init is fine; ``torch.device("meta")``
    construction is fine too); without it the checkpoint's recorded source (timm) builds one. Returns the model
    with its quantized layers restored and frozen storage loaded, in eval/train mode as given (eval when built
    here). If loading fails, a given ``model`` is left as it was.

    A folder written for a diffusers pipeline returns the pipeline (rebuilt, or ``model`` itself when a float
    pipeline of the same class is given: its quantized components are replaced), see
    :func:`vqsuite.pipelines.diffusers_io.load_quantized_pipeline`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    recover_interrupted_save(path)
    if _is_diffusion_pipeline(model) or (Path(path) / PIPELINE_META_NAME).is_file():
        from vqsuite.pipelines.diffusers_io import load_quantized_pipeline

        return load_quantized_pipeline(path, model, device=device)
    path = Path(path)
    meta = read_checkpoint_meta(path)
    config = QuantConfig.from_dict(meta["config"]) if meta.get("config") else None  # validated: it parses
    if model is None:
        model = _build_model(meta)
    undo_method = _restore_method_modules(model, config, path)
    refs = module_references(model)
    replaced: dict[str, nn.Module] = {}
    try:
        for name, entry in meta["layers"].items():
            replaced[name] = _rebuild_layer(model, name, entry, refs)
        try:
            tensors = load_file(str(path / WEIGHTS_NAME), device=str(device))
            # safetensors hands out tensors at unaligned addresses on CPU, where GEMMs round differently:
            # fresh, aligned copies keep loaded outputs bit-identical to the saved model's
            tensors = {k: v.clone() for k, v in tensors.items()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path / WEIGHTS_NAME} is corrupt or unreadable ({tensor_file_reason(e)})") from None
        aliases = meta.get("aliases") or {}
        for alias, canonical in aliases.items():
            if canonical not in tensors:
                raise CheckpointError(
                    f"{path}: alias {name_repr(alias)} points to missing tensor {name_repr(canonical)}"
                )
            tensors[alias] = tensors[canonical]
        _check_tensors(model, tensors, path)
        check_finite(tensors, path / WEIGHTS_NAME)
        check_e8m0_scales(tensors, meta["layers"], path / WEIGHTS_NAME)
    except BaseException:
        for original in replaced.values():  # put the float layers back: a failed load changes nothing
            replace_module(model, refs, original, original)
        undo_method()
        raise
    model.load_state_dict(tensors, strict=True, assign=True)
    _retie(model, aliases)
    attach_step_tracker_if_needed(model)  # per-step static scales: the model publishes its timestep
    if config is not None:
        model.vqsuite_config = config
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{path}: tensor {leftover[0]!r} was not loaded (non-persistent buffer on meta?)")
    return model
