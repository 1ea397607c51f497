"""Saving and loading quantized diffusers pipelines.

Folder layout (a diffusers pipeline folder, with quantized components in vqsuite's module format)::

    model_index.json          the pipeline's own config (diffusers' save_config): class and components
    vqsuite_pipeline.json     which components are quantized, their classes and the components' dtypes
    text_encoder/, vae/, ...  unquantized components, written by their own save_pretrained
    transformer/              a quantized component: config.json (the float architecture, diffusers' save_config),
                              model.safetensors + vqsuite_config.json (vqsuite.save_quantized)
    lora/                     only with LoRA adapters on quantized components (vqsuite.pipelines.lora): their own
                              tensors (adapters.safetensors, diffusers' PEFT key names per adapter) and lora.json
                              (each adapter's LoraConfig, the active ones, every layer's scaling = the strengths)

Loading rebuilds each quantized component from its ``config.json`` with parameters on the meta device (buffers
real, so non-persistent ones such as positional embeddings are computed as usual), swaps in the quantized layers
and loads the packed tensors (:func:`vqsuite.load_quantized`); the other components and the pipeline come from
diffusers' ``from_pretrained`` with the quantized ones passed in. No recalibration. Saving writes a temporary
folder beside the target and renames it into place. Every failure is one readable :class:`CheckpointError` line.
diffusers is imported only inside the functions.

Loading never runs code from the folder and never reads outside it: ``vqsuite_pipeline.json`` and
``model_index.json`` are validated first (:mod:`vqsuite.pipelines.schema`: component names are plain names, the
libraries they name are on allow-lists, dtypes are float dtype names), the folder may hold no symlink out and no
``.py`` file (:mod:`vqsuite.pipelines.folder`), and diffusers is called with ``use_safetensors=True`` (a component
with only a pickle file is refused, never unpickled) and ``trust_remote_code=False``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqsuite.calibrators.timestep import attach_step_tracker_if_needed
from vqsuite.nn import QuantLayer
from vqsuite.pipelines.errors import first_line, read_json_file, short_repr
from vqsuite.pipelines.folder import check_tree, contained_file
from vqsuite.pipelines.io import (
    CONFIG_NAME,
    PIPELINE_META_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_folder,
    read_checkpoint_meta,
    recover_interrupted_save,
    write_json,
)
from vqsuite.pipelines.schema import (
    FLOAT_DTYPES,
    QUANTIZED_LIBRARIES,
    validate_model_index,
    validate_pipeline_meta,
)

logger = logging.getLogger(__name__)

PIPELINE_FORMAT = "vqsuite-quantized-pipeline"
PIPELINE_VERSION = 1
MODEL_INDEX_NAME = "model_index.json"
COMPONENT_CONFIG_NAME = "config.json"
#: LoRA adapters on the quantized components (vqsuite.pipelines.lora): their own tensors and a JSON of configs and
#: strengths, in a folder diffusers' from_pretrained does not read
LORA_DIR = "lora"
LORA_WEIGHTS_NAME = "adapters.safetensors"
LORA_META_NAME = "lora.json"

#: safetensors header dtype names -> torch dtypes (for rebuilding a component with the saved dtypes)
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def _is_quantized(module: Any) -> bool:
    return isinstance(module, nn.Module) and any(isinstance(m, QuantLayer) for m in module.modules())


def _module_dtype(module: nn.Module) -> torch.dtype | None:
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _save_component(comp: Any, folder: Path) -> None:
    save = getattr(comp, "save_pretrained", None)
    if save is None:
        raise CheckpointError(f"component {folder.name!r} ({type(comp).__name__}) has no save_pretrained")
    kwargs = {}
    if "safe_serialization" in inspect.signature(save).parameters:
        kwargs["safe_serialization"] = True
    save(str(folder), **kwargs)


def _save_architecture(comp: nn.Module, folder: Path, name: str) -> None:
    """``config.json`` from which the float architecture is rebuilt: diffusers' ``save_config``, or a
    transformers model's ``config.save_pretrained``."""
    if hasattr(comp, "save_config"):
        comp.save_config(str(folder))
    elif hasattr(getattr(comp, "config", None), "save_pretrained"):
        comp.config.architectures = [type(comp).__name__]  # as transformers' own save_pretrained does
        comp.config.save_pretrained(str(folder))
    else:
        raise CheckpointError(f"component {name!r} ({type(comp).__name__}) has no config to rebuild it from")


def _saved_class(cfg: Any) -> str | None:
    """The class a component's ``config.json`` describes (diffusers ``_class_name``, transformers ``architectures``)."""
    if not isinstance(cfg, dict):
        return None
    if cfg.get("_class_name"):
        name = cfg["_class_name"]
    else:
        arch = cfg.get("architectures")
        name = arch[0] if isinstance(arch, list) and arch else None
    return name if isinstance(name, str) else None


def save_quantized_pipeline(pipe: Any, path: str | os.PathLike) -> Path:
    """Write a pipeline quantized by :func:`vqsuite.quantize_pipeline` to the folder ``path`` (atomically).

    An existing quantized-pipeline folder at ``path`` is replaced; any other existing non-empty path is refused.
    """
    from vqsuite.pipelines.io import save_quantized

    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / PIPELINE_META_NAME).exists() or not any(path.iterdir()))):
        raise CheckpointError(f"{path} exists and is not a vqsuite pipeline folder; refusing to overwrite it")
    components = {k: v for k, v in pipe.components.items()}
    quantized = {k: v for k, v in components.items() if _is_quantized(v)}
    if not quantized:
        raise CheckpointError("the pipeline has no quantized component; run vqsuite.quantize_pipeline first")
    meta = {
        "format": PIPELINE_FORMAT,
        "version": PIPELINE_VERSION,
        "pipeline_class": type(pipe).__name__,
        "vqsuite_version": _vqsuite_version(),
        "quantized": {
            name: {
                "library": type(mod).__module__.split(".")[0],
                "class": type(mod).__name__,
                "dtype": _dtype_name(_module_dtype(mod)),
            }
            for name, mod in quantized.items()
        },
        "dtypes": {
            name: _dtype_name(_module_dtype(mod))
            for name, mod in components.items()
            if isinstance(mod, nn.Module) and _module_dtype(mod) is not None
        },
    }
    with atomic_folder(path) as tmp, _save_lora(pipe, tmp):
        pipe.save_config(str(tmp))  # model_index.json
        for name, comp in components.items():
            if comp is None:
                continue
            if name in quantized:
                save_quantized(comp, tmp / name)
                _save_architecture(comp, tmp / name, name)
            else:
                _save_component(comp, tmp / name)
        write_json(tmp / PIPELINE_META_NAME, meta)
    logger.info("saved %s with quantized %s to %s", type(pipe).__name__, ", ".join(quantized), path)
    return path


def attach_lora_support_if_available(pipe: Any) -> None:
    """:func:`vqsuite.pipelines.lora.attach_lora_support` when peft is installed (diffusers' LoRA loading needs it)."""
    try:
        from vqsuite.pipelines.lora import attach_lora_support
    except ImportError as e:
        logger.debug("LoRA on quantized layers unavailable (%s)", first_line(e))
        return
    attach_lora_support(pipe)


def _save_lora(pipe: Any, folder: Path) -> Any:
    """Write the LoRA adapters on the quantized components (if any) to ``folder/lora/`` and return a context that
    takes them out of the modules while the quantized weights are written."""
    import contextlib

    try:
        from vqsuite.pipelines.lora import lora_checkpoint, lora_detached
    except ImportError:
        return contextlib.nullcontext()
    state = lora_checkpoint(pipe)
    if state is not None:
        from safetensors.torch import save_file

        tensors, lora_meta = state
        (folder / LORA_DIR).mkdir()
        save_file(tensors, str(folder / LORA_DIR / LORA_WEIGHTS_NAME))
        write_json(folder / LORA_DIR / LORA_META_NAME, lora_meta)
    return lora_detached(pipe)


def _load_lora(pipe: Any, path: Path) -> None:
    """Put back the LoRA adapters saved beside the quantized weights (``path/lora/``), if any."""
    attach_lora_support_if_available(pipe)
    meta_file = contained_file(path, f"{LORA_DIR}/{LORA_META_NAME}", "the LoRA config")
    if not meta_file.exists():
        return
    from safetensors.torch import load_file

    from vqsuite.pipelines.lora import restore_lora_checkpoint

    weights = contained_file(path, f"{LORA_DIR}/{LORA_WEIGHTS_NAME}", "the LoRA weights")
    tensors = {k: v.clone() for k, v in load_file(str(weights)).items()}  # own, aligned storage (see _realign)
    try:
        restore_lora_checkpoint(pipe, tensors, read_json_file(meta_file), str(meta_file))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot restore the LoRA adapters of {path}: {first_line(e)}") from None


def _vqsuite_version() -> str:
    from vqsuite import __version__

    return __version__


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / PIPELINE_META_NAME).is_file()


def read_pipeline_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The folder's ``vqsuite_pipeline.json``, validated with ``model_index.json``, every quantized component's
    ``vqsuite_config.json`` and the folder itself (no link out, no code); ``CheckpointError`` otherwise."""
    recover_interrupted_save(path)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a quantized pipeline is a folder with {PIPELINE_META_NAME}")
    if not (path / PIPELINE_META_NAME).is_file():
        what = "a diffusers pipeline folder" if (path / MODEL_INDEX_NAME).is_file() else "a folder"
        raise CheckpointError(f"{path} is {what} without {PIPELINE_META_NAME}: not a vqsuite quantized pipeline")
    check_tree(path)  # before any file is read: no symlink out of the folder, no .py diffusers could import
    meta = read_json_file(path / PIPELINE_META_NAME)
    validate_pipeline_meta(
        meta, path / PIPELINE_META_NAME, pipeline_format=PIPELINE_FORMAT, pipeline_version=PIPELINE_VERSION
    )
    if not (path / MODEL_INDEX_NAME).is_file():
        raise CheckpointError(f"{path} has no {MODEL_INDEX_NAME}: an incomplete quantized pipeline")
    index = read_json_file(path / MODEL_INDEX_NAME)
    components = validate_model_index(index, path / MODEL_INDEX_NAME)
    if index["_class_name"] != meta["pipeline_class"]:
        raise CheckpointError(
            f"{path / MODEL_INDEX_NAME} describes a {index['_class_name']}, {PIPELINE_META_NAME} a "
            f"{meta['pipeline_class']}: the folder was mixed from two pipelines"
        )
    for name, (lib, cls) in components.items():
        if lib is None:
            continue
        if not contained_file(path, name, f"component {name!r}").is_dir():
            raise CheckpointError(f"{path}: component {name!r} ({cls}) is missing (no folder {name}/)")
    for name, entry in meta["quantized"].items():
        if name not in components:
            raise CheckpointError(
                f"{path / PIPELINE_META_NAME}: quantized component {name!r} is not a component in {MODEL_INDEX_NAME}"
            )
        folder = path / name
        for fname in (COMPONENT_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME):
            if not contained_file(folder, fname, f"component {name!r}").is_file():
                raise CheckpointError(f"{path}: quantized component {name!r} has no {fname}")
        saved_cls = _saved_class(read_json_file(folder / COMPONENT_CONFIG_NAME))
        if saved_cls != entry["class"]:
            raise CheckpointError(
                f"{folder / COMPONENT_CONFIG_NAME} describes a {(saved_cls or '?')[:60]}, "
                f"but the pipeline's {name} was a {entry['class']}: a component from another architecture"
            )
        read_checkpoint_meta(folder)  # the component's own vqsuite_config.json, validated field by field
    return meta


def _safetensors_dtypes(file: Path) -> dict[str, torch.dtype]:
    """Name -> dtype from a safetensors header (the data is not read)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt or unreadable ({first_line(e)})") from None
    return {
        k: _ST_DTYPES[v["dtype"]] for k, v in header.items() if isinstance(v, dict) and v.get("dtype") in _ST_DTYPES
    }


def _match_saved_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Give the (meta) float model the saved dtype of each floating tensor the file holds."""
    for name, p in list(model.named_parameters()):
        want = dtypes.get(name)
        if want is not None and p.is_floating_point() and p.dtype != want:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            mod._parameters[attr] = nn.Parameter(
                torch.empty(p.shape, dtype=want, device=p.device), requires_grad=p.requires_grad
            )
    for name, b in list(model.named_buffers()):
        want = dtypes.get(name)
        if want is not None and b.is_floating_point() and b.dtype != want:
            mod_name, _, attr = name.rpartition(".")
            model.get_submodule(mod_name)._buffers[attr] = b.to(want)


def _component_class(library: str, class_name: str) -> type:
    """The model class a quantized component is rebuilt as: a public ``nn.Module`` class of an allowed library
    (never a module the folder names, which importing would run)."""
    import importlib

    if library not in QUANTIZED_LIBRARIES:
        raise CheckpointError(
            f"{PIPELINE_META_NAME}: library {short_repr(library)} is not an allowed library "
            f"({', '.join(QUANTIZED_LIBRARIES)})"
        )
    if not class_name.isidentifier() or class_name.startswith("_"):
        raise CheckpointError(f"{PIPELINE_META_NAME}: {short_repr(class_name)} is not a public class name")
    try:
        lib = importlib.import_module(library)
    except ImportError as e:
        raise CheckpointError(f"cannot import {library!r} to rebuild {class_name} ({first_line(e)})") from None
    cls = getattr(lib, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{library} has no model class {class_name!r} (saved with another version?)")
    return cls


def _rebuild_quantized_component(folder: Path, entry: dict[str, Any], device: str | torch.device) -> nn.Module:
    from accelerate import init_empty_weights

    from vqsuite.pipelines.io import load_quantized

    cls = _component_class(entry.get("library") or "diffusers", entry["class"])
    try:
        with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (pos. embeddings) real
            if hasattr(cls, "load_config"):  # a diffusers model
                model = cls.from_config(cls.load_config(str(folder)))
            else:  # a transformers model
                model = cls(cls.config_class.from_pretrained(str(folder)))
    except CheckpointError:
        raise
    except Exception as e:
        where = folder / COMPONENT_CONFIG_NAME
        raise CheckpointError(f"cannot rebuild {entry['class']} from {where}: {first_line(e)}") from None
    model.eval()
    _match_saved_dtypes(model, _safetensors_dtypes(folder / WEIGHTS_NAME))
    model = load_quantized(folder, model=model, device=device)
    _realign(model)
    return model.to(device)


@torch.no_grad()
def _realign(module: nn.Module) -> None:
    """Give every parameter and buffer its own freshly allocated storage.

    Tensors loaded by safetensors are views into one file buffer at arbitrary byte offsets; CPU GEMM kernels
    (oneDNN/MKL) take different code paths for unaligned operands and round differently, so a loaded model would
    not reproduce the saved one bit for bit. A copy sits at the allocator's aligned address like the original.
    Tied tensors stay tied (each storage is copied once).
    """
    copies: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for k, t in table.items():
                if t is None or t.device.type == "meta":
                    continue
                key = id(t)
                if key not in copies:
                    data = t.detach().clone(memory_format=torch.contiguous_format)
                    copies[key] = (
                        nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
                    )
                table[k] = copies[key]


#: config entries that describe how a component was saved, not its architecture
_META_KEYS = frozenset({"architectures", "transformers_version", "dtype", "torch_dtype"})


def _config_dict(module: nn.Module) -> dict[str, Any]:
    """A component's config as a plain dict (diffusers FrozenDict or transformers PretrainedConfig)."""
    cfg = getattr(module, "config", None)
    if hasattr(cfg, "to_dict") and not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    return _plain(dict(cfg or {}))


def _plain(value: Any) -> Any:
    """A config value as JSON would hold it (tuples become lists), for comparing configs."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_quantized_pipeline(path: str | os.PathLike, pipe: Any = None, *, device: str | torch.device = "cpu") -> Any:
    """Rebuild a pipeline saved by :func:`save_quantized_pipeline`, without recalibration.

    With ``pipe`` (a float pipeline of the same class, loaded by the user), its components named in the folder
    are replaced by the quantized ones, in place (a failed load leaves ``pipe`` as it was) and ``pipe`` is
    returned; without it, the whole pipeline is loaded from the folder.
    """
    path = Path(path)
    meta = read_pipeline_meta(path)
    if pipe is not None:
        if type(pipe).__name__ != meta["pipeline_class"]:
            raise CheckpointError(
                f"{path} holds a quantized {meta['pipeline_class']}; cannot load it into a {type(pipe).__name__}"
            )
        loaded = {}
        for name, entry in meta["quantized"].items():
            comp = pipe.components.get(name)
            if type(comp).__name__ != entry["class"]:
                raise CheckpointError(
                    f"{path}: component {name!r} is a {entry['class']}, the pipeline's is a {type(comp).__name__}"
                )
            loaded[name] = _rebuild_quantized_component(path / name, entry, device)
        for name, mod in loaded.items():
            own_cfg, saved_cfg = _config_dict(pipe.components[name]), _config_dict(mod)
            keys = sorted(k for k in set(own_cfg) | set(saved_cfg) if not k.startswith("_") and k not in _META_KEYS)
            diff = [k for k in keys if own_cfg.get(k) != saved_cfg.get(k)]
            if diff:
                raise CheckpointError(
                    f"{path}: component {name!r} has another architecture than the pipeline's ({diff[0]}: "
                    f"{saved_cfg.get(diff[0])!r} saved, {own_cfg.get(diff[0])!r} in the pipeline)"
                )
        for name, mod in loaded.items():
            setattr(pipe, name, mod)
        attach_step_tracker_if_needed(pipe)  # per-step static scales read the step from the denoiser's hook
        _load_lora(pipe, path)
        return pipe

    import diffusers

    cls = getattr(diffusers, meta["pipeline_class"], None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise CheckpointError(f"diffusers {diffusers.__version__} has no pipeline class {meta['pipeline_class']!r}")
    connected = getattr(cls, "_load_connected_pipes", False) and (path / "README.md").is_file()
    if cls is diffusers.DiffusionPipeline or connected:
        # the generic class resolves the real one from the folder; a connected pipeline (with a README.md) would
        # load its prior pipeline from the hub, outside the folder
        raise CheckpointError(f"{path / PIPELINE_META_NAME}: pipeline_class {cls.__name__!r} cannot be loaded safely")
    quantized = {
        name: _rebuild_quantized_component(path / name, entry, device) for name, entry in meta["quantized"].items()
    }
    dtypes = {k: FLOAT_DTYPES[v] for k, v in (meta.get("dtypes") or {}).items() if k not in quantized and v}
    try:
        # safetensors only: a component folder holding just a pickle (.bin) is refused by diffusers/transformers,
        # never unpickled; no code from the folder or the hub (the folder was checked for .py files already)
        pipe = cls.from_pretrained(
            str(path), dtype=dtypes or None, use_safetensors=True, trust_remote_code=False, **quantized
        )
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot load the other components of {path}: {first_line(e)}") from None
    for name, comp in pipe.components.items():
        if isinstance(comp, nn.Module) and name not in quantized:
            _realign(comp)  # from_pretrained's tensors are views into the file buffer too
    if str(device) != "cpu":
        pipe.to(device)
    attach_step_tracker_if_needed(pipe)
    _load_lora(pipe, path)
    return pipe
