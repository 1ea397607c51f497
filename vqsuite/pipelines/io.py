"""Saving and loading quantized models: a folder with ``model.safetensors`` and ``vqsuite_config.json``.

The JSON records, for every quantized layer, its class, constructor arguments, spec and state, so
``load_quantized`` can rebuild the layers on the meta device and load the packed tensors into them with a
strict key, shape and dtype check. No pickle is involved anywhere. Saving writes into a temporary folder
beside the target and renames it into place, so a crash never leaves a half-written checkpoint and never
damages an existing one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqsuite.calibrators.timestep import attach_step_tracker_if_needed
from vqsuite.config import CONFIG_VERSION, QuantConfig, QuantSpec
from vqsuite.errors import UserError
from vqsuite.fileio import (  # noqa: F401 - re-exported: atomic saving lives in vqsuite.fileio
    _fsync_dir,
    atomic_folder,
    recover_interrupted_save,
    write_json,
)
from vqsuite.nn import QConv2d, QConvTranspose2d, QLinear, QLinearLowRank, QuantLayer
from vqsuite.pipelines.modules import module_references, replace_module

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vqsuite-quantized"
CHECKPOINT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "vqsuite_config.json"

#: quantized layer classes a checkpoint may name, and the float type each replaces
LAYER_CLASSES: dict[str, tuple[type[QuantLayer], type[nn.Module]]] = {
    "QLinear": (QLinear, nn.Linear),
    "QLinearLowRank": (QLinearLowRank, nn.Linear),
    "QConv2d": (QConv2d, nn.Conv2d),
    "QConvTranspose2d": (QConvTranspose2d, nn.ConvTranspose2d),
}


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message is one readable line."""


#: marker file of a quantized diffusers pipeline folder (see ``vqsuite.pipelines.diffusers_io``)
PIPELINE_META_NAME = "vqsuite_pipeline.json"


def _is_diffusion_pipeline(obj: Any) -> bool:
    """A diffusers ``DiffusionPipeline``, recognised by class name so diffusers is never imported here."""
    return any(c.__name__ == "DiffusionPipeline" and c.__module__.startswith("diffusers") for c in type(obj).__mro__)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint")
    return dt


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
    """The checkpoint's JSON, validated; ``CheckpointError`` with one readable line otherwise."""
    recover_interrupted_save(path)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a vqsuite checkpoint is a folder with {CONFIG_NAME}")
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / fname).is_file():
            raise CheckpointError(f"{path} has no {fname}: not a vqsuite checkpoint (or an incomplete one)")
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path / CONFIG_NAME} is not a {CHECKPOINT_FORMAT} config")
    if meta.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint version {meta.get('checkpoint_version')!r} is not supported (this vqsuite reads "
            f"{CHECKPOINT_VERSION}); re-save it with a matching vqsuite"
        )
    if meta.get("config_version") != CONFIG_VERSION:
        raise CheckpointError(
            f"config version {meta.get('config_version')!r} is not supported (this vqsuite reads {CONFIG_VERSION})"
        )
    if not isinstance(meta.get("layers"), dict):
        raise CheckpointError(f"{path / CONFIG_NAME} lists no layers")
    return meta


def _build_model(meta: dict[str, Any]) -> nn.Module:
    src = meta.get("model_source")
    if not src:
        raise CheckpointError(
            f"the checkpoint does not record how to build {meta.get('model_class', 'the model')}; "
            "pass the float model: load_quantized(path, model=...)"
        )
    if src.get("library") == "timm":
        import timm

        try:
            # eval: a checkpoint loaded without a model is for inference (train-mode BN would use batch stats)
            return timm.create_model(src["name"], pretrained=False, **src.get("kwargs", {})).eval()
        except Exception as e:  # an unknown name or bad kwargs: one readable line
            raise CheckpointError(f"cannot build timm model {src.get('name')!r}: {e}") from None
    if src.get("library") == "vqsuite.zoo":
        from vqsuite import zoo

        try:
            return zoo.load(src["name"]).model.eval()
        except (KeyError, zoo.AssetMissingError) as e:  # unknown name or missing package: one readable line
            raise CheckpointError(f"cannot build zoo model {src.get('name')!r}: {e}") from None
    raise CheckpointError(f"unknown model source {src!r}; pass the float model: load_quantized(path, model=...)")


def _restore_method_modules(model: nn.Module, config: QuantConfig | None, path: Path) -> Callable[[], None]:
    """Modules a method adds beside the quantized layers (``vit-ptq``: activation quantizer wrappers), put back on
    the float model before its state is loaded; returns an undo for a failed load."""
    if config is None or config.method != "vit-ptq":
        return lambda: None
    from vqsuite.calibrators.vit_ptq import restore_vit_ptq

    try:
        return restore_vit_ptq(model, config.options)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _rebuild_layer(model: nn.Module, name: str, entry: dict[str, Any], refs: dict[int, list[str]]) -> nn.Module:
    """Swap the model's layer ``name`` (everywhere it is used) for an empty quantized one; returns the old one."""
    try:
        cls, float_type = LAYER_CLASSES[entry["class"]]
    except (KeyError, TypeError):
        raise CheckpointError(f"layer {name!r}: unknown quantized class {entry.get('class')!r}") from None
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"layer {name!r} of the checkpoint does not exist in the model") from None
    if not isinstance(current, (float_type, cls)):
        raise CheckpointError(
            f"layer {name!r} is a {type(current).__name__} in the model but a {float_type.__name__} in the checkpoint"
        )
    try:
        spec = QuantSpec.from_dict(entry["spec"])
        dtype = _dtype_from_name(entry["weight_dtype"])
        q = cls(**entry["args"], spec=spec, device="meta", dtype=dtype)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"layer {name!r}: invalid entry in checkpoint ({e})") from None
    q.layer_name = name
    q.train(current.training)
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


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensor(s), first {missing[0]!r}")
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s), first {extra[0]!r}")
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
    config = None
    if meta.get("config"):
        try:
            config = QuantConfig.from_dict(meta["config"])
        except ValueError as e:
            raise CheckpointError(f"{path / CONFIG_NAME}: bad config ({e})") from None
    if model is None:
        model = _build_model(meta)
    undo_method = _restore_method_modules(model, config, path)
    refs = module_references(model)
    replaced: dict[str, nn.Module] = {}
    try:
        for name, entry in meta["layers"].items():
            if not isinstance(entry, dict):
                raise CheckpointError(f"layer {name!r}: invalid entry in checkpoint")
            replaced[name] = _rebuild_layer(model, name, entry, refs)
        try:
            tensors = load_file(str(path / WEIGHTS_NAME), device=str(device))
            # safetensors hands out tensors at unaligned addresses on CPU, where GEMMs round differently:
            # fresh, aligned copies keep loaded outputs bit-identical to the saved model's
            tensors = {k: v.clone() for k, v in tensors.items()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path / WEIGHTS_NAME} is corrupt or unreadable ({e})") from None
        aliases = meta.get("aliases") or {}
        for alias, canonical in aliases.items():
            if canonical not in tensors:
                raise CheckpointError(f"{path}: alias {alias!r} points to missing tensor {canonical!r}")
            tensors[alias] = tensors[canonical]
        _check_tensors(model, tensors, path)
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
