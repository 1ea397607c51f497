"""What a MODEL argument names, and loading it: a local diffusers pipeline folder (float or quantized by vqsuite),
a quantized module checkpoint, ``timm:<name>`` / ``torchvision:<name>``, or a built-in model of the suite.

Everything is local: pipelines load with ``local_files_only=True`` and the hub is never asked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vqsuite.cli.errors import CLIError, check_device, one_line

logger = logging.getLogger(__name__)

Kind = Literal["float-pipeline", "quantized-pipeline", "quantized-module", "module", "builtin"]

#: file the CLI writes beside a quantized output: where it came from and the layer report
REPORT_JSON = "report.json"
REPORT_TXT = "report.txt"

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Source:
    """A resolved MODEL argument."""

    kind: Kind
    arg: str
    path: Path | None = None


def builtin_models() -> list[str]:
    """Names of the suite's built-in models (:mod:`vqsuite.zoo`), empty when this build ships none."""
    try:
        from vqsuite import zoo
    except ImportError:
        return []
    try:
        return [str(n) for n in zoo.list()]
    except Exception as e:  # a zoo that cannot list itself must not break the CLI
        logger.warning("vqsuite.zoo.list() failed: %s", one_line(e))
        return []


def builtin_kind(name: str) -> str:
    """``classifier``, ``generator`` or ``features``: what zoo entry ``name`` is (without loading it)."""
    from vqsuite import zoo

    entry = getattr(zoo, "_REGISTRY", {}).get(name)
    return str(getattr(entry, "kind", "classifier"))


def load_builtin(name: str) -> Any:
    """The float network of zoo entry ``name`` (eval mode, CPU); a missing asset package is one line."""
    from vqsuite import zoo

    try:
        return zoo.load(name).model
    except KeyError:
        raise CLIError(f"no built-in model {name!r}; built-in models: {', '.join(builtin_models())}") from None


def _looks_like_path(arg: str) -> bool:
    return "/" in arg or "\\" in arg or arg.startswith((".", "~")) or arg.endswith((".json", ".safetensors"))


def resolve(arg: str, *, folders_only: bool = False) -> Source:
    """Classify a MODEL argument without loading anything; a one-line :class:`CLIError` when it names nothing.

    ``folders_only``: the command takes pipeline folders (and built-in models) only (``generate``), so a missing
    folder is named as such.
    """
    path = Path(arg).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{arg} is a file; MODEL must be a pipeline folder, 'timm:<name>' or a built-in model")
        if (path / "vqsuite_pipeline.json").is_file():
            return Source("quantized-pipeline", arg, path)
        if (path / "vqsuite_config.json").is_file():
            return Source("quantized-module", arg, path)
        if (path / "model_index.json").is_file():
            return Source("float-pipeline", arg, path)
        raise CLIError(f"{arg} is not a diffusers pipeline folder (no model_index.json)")
    if folders_only:
        if not _looks_like_path(arg) and arg in builtin_models():
            return Source("builtin", arg)
        raise CLIError(f"no such folder: {arg} (a diffusers pipeline folder, float or quantized by vqsuite)")
    lib, sep, _ = arg.partition(":")
    if sep and lib in ("timm", "torchvision"):
        return Source("module", arg)
    if _looks_like_path(arg):
        raise CLIError(f"no such folder: {arg}")
    names = builtin_models()
    if arg in names:
        return Source("builtin", arg)
    known = f"; built-in models: {', '.join(names)}" if names else ""
    raise CLIError(
        f"model {arg!r} must look like 'timm:<name>' or 'torchvision:<name>', or be a local diffusers pipeline folder "
        f"or a built-in model{known}"
    )


def torch_dtype(name: str | None) -> Any:
    import torch

    if name is None:
        return None
    if name not in _DTYPES:
        raise CLIError(f"--dtype {name!r} is not one of {', '.join(_DTYPES)}")
    return getattr(torch, name)


def pick_device(name: str) -> str:
    """``--device`` resolved (``auto`` is CUDA when there is one, else CPU); an unusable device is a user error.

    ``main`` already resolved ``args.device`` before the command ran (:func:`~vqsuite.cli.errors.check_device`);
    this is the same check for callers that skip ``main``.
    """
    return check_device(name)


def quiet_hf_progress(verbose: bool) -> None:
    """diffusers' and transformers' own loading bars and info logs only with ``--verbose``."""
    if verbose:
        return
    try:
        import diffusers.utils.logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
    except ImportError:
        pass
    try:
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass


def load_float_pipeline(path: Path, *, dtype: str | None = None, device: str = "cpu") -> Any:
    """A diffusers pipeline from a local folder (``local_files_only``); one line when the folder is not one."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise CLIError("loading a pipeline needs diffusers (pip install diffusers)") from None
    kw: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kw["dtype"] = torch_dtype(dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), **kw)
    except Exception as e:  # a broken folder surfaces as any of a dozen exception types
        raise CLIError(f"cannot load a diffusers pipeline from {path}: {one_line(e)}") from None
    if device != "cpu":
        pipe.to(device)
    return pipe


def load_quantized_pipeline(path: Path, *, device: str = "cpu") -> Any:
    """A pipeline saved by ``vqsuite quantize`` (:func:`vqsuite.load_quantized`); no recalibration."""
    import vqsuite

    return vqsuite.load_quantized(path, device=device)


def recorded_source(path: Path) -> Path | None:
    """The float pipeline folder a quantized folder was made from, as ``vqsuite quantize`` recorded it."""
    file = path / REPORT_JSON
    if not file.is_file():
        return None
    try:
        src = json.loads(file.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(src) if isinstance(src, str) and src else None


# ------------------------------------------------------------------------------------ zoo pipelines
#: PixArt's resolution binning knows these transformer sample sizes (latent side) only: 32/64/128 (Alpha), 256
#: (Sigma); any other raises "Invalid sample size" inside the pipeline call
_PIXART_BIN_SAMPLE_SIZES = (32, 64, 128, 256)


def is_builtin_pipeline(src: Source) -> bool:
    """Whether ``src`` names a zoo entry of kind ``"pipeline"`` (``mini-sd``, ``mini-pixart``)."""
    return src.kind == "builtin" and builtin_kind(src.arg) == "pipeline"


def builtin_call_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments every call of zoo pipeline ``name`` needs (its ``meta["call_kwargs"]``; often empty)."""
    from vqsuite import zoo

    entry = getattr(zoo, "_REGISTRY", {}).get(name)
    return dict((getattr(entry, "meta", None) or {}).get("call_kwargs") or {})


def builtin_prompts(name: str) -> list[str]:
    """The zoo pipeline's own prompts, ``preprocess(k)`` for the digits ``k = 0..9`` (default calibration set)."""
    from vqsuite import zoo

    entry = zoo._REGISTRY[name]
    make = entry.preprocess()
    return [str(make(k)) for k in range(10)]


def load_builtin_pipeline(name: str, *, dtype: str | None = None, device: str = "cpu") -> Any:
    """The ready diffusers pipeline of zoo entry ``name`` (shipped weights, offline), in ``dtype`` on ``device``."""
    pipe = load_builtin(name)
    if dtype is not None:
        pipe.to(dtype=torch_dtype(dtype))
    if device != "cpu":
        pipe.to(device)
    return pipe


def pipeline_call_kwargs(pipe: Any, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extra keyword arguments a pipeline's calls need: ``recorded`` ones (a zoo entry's ``call_kwargs``, or what
    ``vqsuite quantize`` saved beside a folder), plus ``use_resolution_binning=False`` for a PixArt pipeline whose
    transformer ``sample_size`` has no resolution bins (the call would raise otherwise), and
    ``clean_caption=False`` (caption cleaning needs bs4/ftfy). Only arguments ``pipe.__call__`` takes are kept."""
    import inspect

    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return dict(recorded or {})
    kw: dict[str, Any] = {}
    if "clean_caption" in params:
        kw["clean_caption"] = False
    if "use_resolution_binning" in params and type(pipe).__name__.startswith("PixArt"):
        sample = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "sample_size", None)
        if sample not in _PIXART_BIN_SAMPLE_SIZES:
            kw["use_resolution_binning"] = False
    kw.update({k: v for k, v in (recorded or {}).items() if k in params})
    return kw


def recorded_call_kwargs(path: Path) -> dict[str, Any]:
    """The call keyword arguments ``vqsuite quantize`` recorded beside a quantized folder (empty when none)."""
    file = path / REPORT_JSON
    if not file.is_file():
        return {}
    try:
        kw = json.loads(file.read_text()).get("call_kwargs")
    except (OSError, ValueError, AttributeError):
        return {}
    return dict(kw) if isinstance(kw, dict) else {}


def recorded_builtin(path: Path) -> str | None:
    """The zoo pipeline a quantized folder was made from (``vqsuite quantize mini-sd ...``), or None."""
    file = path / REPORT_JSON
    if not file.is_file():
        return None
    try:
        name = json.loads(file.read_text()).get("builtin")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name in builtin_models() else None
