"""Validation of a checkpoint's JSON before any of it is used.

``vqsuite_config.json`` (a module checkpoint), ``vqsuite_pipeline.json`` and ``model_index.json`` (a quantized
pipeline folder) are read from folders someone else may have written. Every field is checked here for type and
value first, so a string where a table belongs, a bogus dtype or a library that is not on the allow-list gives one
:class:`CheckpointError` line naming the file and the field (``layers['fc1'].weight_dtype``), never a
``TypeError`` from deep inside a constructor. Values are quoted back clipped (:func:`short_repr`); tables and lists
are named, not printed. Nothing here imports diffusers, transformers or timm.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from vqsuite.config import CONFIG_VERSION, QuantConfig, QuantSpec
from vqsuite.pipelines.errors import CheckpointError, name_repr, short_repr
from vqsuite.pipelines.folder import check_component_name

__all__ = [
    "COMPONENT_LIBRARIES",
    "FLOAT_DTYPES",
    "MODEL_SOURCES",
    "QUANTIZED_LIBRARIES",
    "float_dtype",
    "validate_checkpoint_meta",
    "validate_model_index",
    "validate_pipeline_meta",
]

#: dtype names a checkpoint may give for float weights and components (not ``getattr(torch, name)``)
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
#: libraries a quantized component's class may be imported from (``vqsuite_pipeline.json``)
QUANTIZED_LIBRARIES = ("diffusers", "transformers", "vqsuite")
#: libraries ``model_index.json`` may name for a component (diffusers imports them); besides these, a diffusers
#: pipeline subpackage (``["stable_diffusion", "StableDiffusionSafetyChecker"]``) as ``save_pretrained`` writes it
COMPONENT_LIBRARIES = ("diffusers", "transformers")
#: how a module checkpoint may say its float architecture is built (``model_source.library``)
MODEL_SOURCES = ("timm", "vqsuite.zoo")
#: ``timm.create_model`` keywords that read weights or configs from files or the hub: never from a checkpoint
_TIMM_FILE_KWARGS = frozenset(
    {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
#: a layer size or stride larger than this is not a real layer
_MAX_INT = 2**31 - 1


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a table" if isinstance(value, dict) else "a list"


def _fail(file: Path, field: str, problem: str) -> NoReturn:
    raise CheckpointError(f"{file}: {field} {problem}")


def _bad_value(file: Path, field: str, value: Any, problem: str) -> NoReturn:
    if isinstance(value, (dict, list)):
        _fail(file, field, f"is {_kind(value)}; {problem}")
    _fail(file, f"{field}={short_repr(value)}", problem)


def _key(parent: str, key: Any) -> str:
    """``parent.key`` for a plain key, ``parent['odd key']`` otherwise."""
    if isinstance(key, str) and _IDENTIFIER.fullmatch(key) and len(key) <= 48:
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{short_repr(key)}]"


def _table(value: Any, file: Path, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(file, field, f"must be a table, not {_kind(value)}")
    return value


def _string(value: Any, file: Path, field: str) -> str:
    if not isinstance(value, str):
        _fail(file, field, f"must be a string, not {_kind(value)}")
    return value


def _identifier(value: Any, file: Path, field: str, what: str) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        _bad_value(file, field, value, f"is not a {what} name")
    return value


def _optional_string(meta: dict[str, Any], key: str, file: Path, parent: str = "") -> None:
    if meta.get(key) is not None:
        _string(meta[key], file, _key(parent, key))


def float_dtype(value: Any, file: Path, field: str) -> torch.dtype:
    """The dtype a float dtype name stands for; any other value (``"float128"``, ``"Tensor"``) is refused."""
    if not isinstance(value, str) or value not in FLOAT_DTYPES:
        _bad_value(file, field, value, f"is not a float dtype name ({', '.join(FLOAT_DTYPES)})")
    return FLOAT_DTYPES[value]


def _unknown_keys(table: dict[str, Any], known: set[str] | frozenset[str], file: Path, field: str) -> None:
    extra = sorted(k for k in table if k not in known)
    if extra:
        _fail(file, _key(field, extra[0]), f"is not a known field (known: {', '.join(sorted(known))})")


# ------------------------------------------------------------------------------------- layer arguments
def _int_ok(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= _MAX_INT


def _ints_ok(v: Any, lo: int, n: int) -> bool:
    """An int >= lo, or a list of ``n`` of them (a conv argument of ``n`` spatial dims)."""
    return _int_ok(v, lo) or (isinstance(v, list) and len(v) == n and all(_int_ok(x, lo) for x in v))


_Arg = tuple[Callable[[Any], bool], str]
_POSITIVE: _Arg = (lambda v: _int_ok(v, 1), "a positive integer")
_BOOL: _Arg = (lambda v: isinstance(v, bool), "true or false")
_RANK: _Arg = (lambda v: v is None or _int_ok(v, 0), "an integer >= 0 or null")
_PADDING_MODE: _Arg = (lambda v: v in ("zeros", "reflect", "replicate", "circular"), "zeros/reflect/replicate/circular")
_CONV_REQUIRED = frozenset({"in_channels", "out_channels", "kernel_size"})


def _conv_args(n: int, transposed: bool) -> dict[str, _Arg]:
    """Checks of a quantized conv's recorded arguments, ``n`` spatial dims (``QConv{n}d``, ``QConvTranspose{n}d``)."""
    many = "a pair" if n == 2 else f"a list of {n}"  # the 2-D wording predates the other dims
    pos: _Arg = (lambda v: _ints_ok(v, 1, n), f"a positive integer or {many} of them")
    nonneg: _Arg = (lambda v: _ints_ok(v, 0, n), f"an integer >= 0 or {many} of them")
    args = {"in_channels": _POSITIVE, "out_channels": _POSITIVE, "kernel_size": pos, "stride": pos}
    if transposed:
        return {
            **args,
            "padding": nonneg,
            "output_padding": nonneg,
            "groups": _POSITIVE,
            "bias": _BOOL,
            "dilation": pos,
        }
    padding: _Arg = (
        lambda v: _ints_ok(v, 0, n) or v in ("same", "valid"),
        f"an integer >= 0, {many}, 'same' or 'valid'",
    )
    return {
        **args,
        "padding": padding,
        "dilation": pos,
        "groups": _POSITIVE,
        "bias": _BOOL,
        "padding_mode": _PADDING_MODE,
    }


#: per quantized layer class: its constructor's keyword arguments a checkpoint records (``ctor_kwargs()``), each
#: with its check, and which of them must be present
LAYER_ARGS: dict[str, tuple[dict[str, _Arg], frozenset[str]]] = {
    "QLinear": (
        {"in_features": _POSITIVE, "out_features": _POSITIVE, "bias": _BOOL},
        frozenset({"in_features", "out_features"}),
    ),
    "QLinearLowRank": (
        {"in_features": _POSITIVE, "out_features": _POSITIVE, "bias": _BOOL, "rank": _RANK},
        frozenset({"in_features", "out_features"}),
    ),
    **{f"QConv{n}d": (_conv_args(n, transposed=False), _CONV_REQUIRED) for n in (1, 2, 3)},
    **{f"QConvTranspose{n}d": (_conv_args(n, transposed=True), _CONV_REQUIRED) for n in (1, 2, 3)},
}
#: SVDQuant convs (``QConv2dLowRank`` & co) record the plain conv's arguments and the branch rank
for _base in [name for name in LAYER_ARGS if name.startswith("QConv")]:
    LAYER_ARGS[f"{_base}LowRank"] = ({**LAYER_ARGS[_base][0], "rank": _RANK}, LAYER_ARGS[_base][1])
#: TF-"SAME" convs (timm ``Conv2dSame`` & co) record QConv2d's arguments
LAYER_ARGS["QConv2dSame"] = LAYER_ARGS["QConv2d"]
_LAYER_KEYS = frozenset({"class", "args", "spec", "frozen", "weight_dtype"})


def _validate_layer(name: str, entry: Any, file: Path) -> None:
    field = f"layers[{name_repr(name)}]"
    if not name or any(not part for part in name.split(".")):
        _fail(file, field, "is not a module name (empty, or an empty part between dots)")
    entry = _table(entry, file, field)
    _unknown_keys(entry, _LAYER_KEYS, file, field)
    for key in ("class", "args", "spec", "weight_dtype"):
        if key not in entry:
            _fail(file, f"{field}.{key}", "is missing")
    cls = entry["class"]
    if not isinstance(cls, str) or cls not in LAYER_ARGS:
        raise CheckpointError(
            f"{file}: layer {name_repr(name)}: unknown quantized class {short_repr(cls)} ({field}.class is one of "
            f"{', '.join(n for n in LAYER_ARGS if not n.endswith('LowRank') or n == 'QLinearLowRank')}, or a conv "
            "class + 'LowRank')"
        )
    args = _table(entry["args"], file, f"{field}.args")
    checks, required = LAYER_ARGS[cls]
    _unknown_keys(args, frozenset(checks), file, f"{field}.args")
    for key in sorted(required - set(args)):
        _fail(file, f"{field}.args.{key}", f"is missing ({cls} needs {', '.join(sorted(required))})")
    for key, value in args.items():
        ok, what = checks[key]
        if not ok(value):
            _bad_value(file, f"{field}.args.{key}", value, f"must be {what}")
    spec = _table(entry["spec"], file, f"{field}.spec")
    try:
        QuantSpec.from_dict(spec)
    except (ValueError, TypeError) as e:
        _fail(file, f"{field}.spec", f"is not a valid QuantSpec ({_clip(e)})")
    if "frozen" in entry and not isinstance(entry["frozen"], bool):
        _bad_value(file, f"{field}.frozen", entry["frozen"], "must be true or false")
    float_dtype(entry["weight_dtype"], file, f"{field}.weight_dtype")


def _clip(e: BaseException, n: int = 160) -> str:
    """An exception's first line, clipped (library messages can quote long values)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= n else text[: n - 3] + "..."


# ------------------------------------------------------------------------------------- module checkpoints
def _validate_model_source(src: Any, file: Path) -> None:
    src = _table(src, file, "model_source")
    _unknown_keys(src, {"library", "name", "kwargs"}, file, "model_source")
    lib = src.get("library")
    if lib not in MODEL_SOURCES:
        _bad_value(file, "model_source.library", lib, f"is not an allowed model source ({', '.join(MODEL_SOURCES)})")
    name = src.get("name")
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        _bad_value(file, "model_source.name", name, "is not a model name (letters, digits, '_', '-', '.')")
    kwargs = _table(src.get("kwargs") or {}, file, "model_source.kwargs")
    if kwargs and lib != "timm":
        _fail(file, "model_source.kwargs", f"must be empty for {lib}")
    for key, value in kwargs.items():
        field = _key("model_source.kwargs", key)
        if not _IDENTIFIER.fullmatch(key) or key in _TIMM_FILE_KWARGS:
            _fail(file, field, "is not an allowed model argument (file and hub arguments never come from a checkpoint)")
        if not _plain_value(value):
            _fail(file, field, f"must be a number, string, true/false, null or a list of them, not {_kind(value)}")


def _validate_config(cfg: Any, file: Path) -> None:
    """The recipe (``QuantConfig.to_dict()``): its shape first (so a wrong type names its field), then it must parse."""
    cfg = _table(cfg, file, "config")
    if "default" in cfg:
        _table(cfg["default"], file, "config.default")
    overrides = cfg.get("overrides", [])
    if not isinstance(overrides, list):
        _fail(file, "config.overrides", f"must be a list of [pattern, spec] pairs, not {_kind(overrides)}")
    for i, item in enumerate(overrides):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            _fail(file, f"config.overrides[{i}]", "must be a [pattern, spec or null] pair")
        if item[1] is not None:
            _table(item[1], file, f"config.overrides[{i}][1]")
    exclude = cfg.get("exclude", [])
    if not (isinstance(exclude, list) and all(isinstance(p, str) for p in exclude)):
        _fail(file, "config.exclude", "must be a list of patterns (strings)")
    for key in ("name", "method"):
        if cfg.get(key) is not None:
            _string(cfg[key], file, f"config.{key}")
    if cfg.get("method_options") is not None:
        _table(cfg["method_options"], file, "config.method_options")
    try:
        QuantConfig.from_dict(cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{file}: bad config ({_clip(e)})") from None


def _plain_value(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, list) and depth < 3 and all(_plain_value(v, depth + 1) for v in value)


def _check_header(meta: Any, file: Path, fmt: str, noun: str) -> None:
    """``meta`` is a JSON object whose ``format`` is ``fmt``, else ``{file} is not a {fmt} {noun}``."""
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{file} is not a {fmt} {noun}")


def _check_version(meta: dict[str, Any], key: str, want: int, what: str, hint: str = "") -> None:
    """``meta[key] == want``, else ``{what} version X is not supported (this vqsuite reads want){hint}``."""
    if meta.get(key) != want:
        raise CheckpointError(
            f"{what} version {short_repr(meta.get(key))} is not supported (this vqsuite reads {want}){hint}"
        )


def validate_checkpoint_meta(meta: Any, file: Path, *, checkpoint_format: str, checkpoint_version: int) -> None:
    """Check every field of a module checkpoint's ``vqsuite_config.json`` (parsed JSON ``meta``) before use.

    Unknown top-level fields are ignored (a newer writer may add some); unknown fields inside a layer entry are
    refused. The quantization config and each layer's spec are parsed, their errors wrapped.
    """
    _check_header(meta, file, checkpoint_format, "config")
    _check_version(meta, "checkpoint_version", checkpoint_version, "checkpoint", "; re-save it with a matching vqsuite")
    _check_version(meta, "config_version", CONFIG_VERSION, "config")
    for key in ("vqsuite_version", "model_class"):
        _optional_string(meta, key, file)
    if meta.get("config") is not None:
        _validate_config(meta["config"], file)
    if meta.get("model_source") is not None:
        _validate_model_source(meta["model_source"], file)
    if not isinstance(meta.get("layers"), dict):
        if "layers" not in meta:
            raise CheckpointError(f"{file} lists no layers")
        _fail(file, "layers", f"must be a table, not {_kind(meta['layers'])}")
    for name, entry in meta["layers"].items():
        _validate_layer(name, entry, file)
    aliases = _table(meta.get("aliases") or {}, file, "aliases")
    for alias, canonical in aliases.items():
        if not isinstance(canonical, str) or not canonical:
            _bad_value(file, f"aliases[{name_repr(alias)}]", canonical, "must be a tensor name")


# ------------------------------------------------------------------------------------- pipeline folders
_QUANTIZED_KEYS = frozenset({"library", "class", "dtype"})


def validate_pipeline_meta(meta: Any, file: Path, *, pipeline_format: str, pipeline_version: int) -> None:
    """Check every field of ``vqsuite_pipeline.json`` (parsed JSON ``meta``) before use: component names are plain
    names, each quantized entry names an allowed library, a class name and a float dtype, ``dtypes`` maps
    components to float dtype names."""
    _check_header(meta, file, pipeline_format, "file")
    _check_version(meta, "version", pipeline_version, "quantized-pipeline")
    if "quantized" not in meta or meta["quantized"] == {}:
        raise CheckpointError(f"{file} lists no quantized component")
    _identifier(meta.get("pipeline_class"), file, "pipeline_class", "pipeline class")
    _optional_string(meta, "vqsuite_version", file)
    for name, entry in _table(meta["quantized"], file, "quantized").items():
        check_component_name(name, f"{file}: quantized")
        field = _key("quantized", name)
        entry = _table(entry, file, field)
        _unknown_keys(entry, _QUANTIZED_KEYS, file, field)
        lib = entry.get("library", "diffusers")
        if lib not in QUANTIZED_LIBRARIES:
            _bad_value(file, f"{field}.library", lib, f"is not an allowed library ({', '.join(QUANTIZED_LIBRARIES)})")
        _identifier(entry.get("class"), file, f"{field}.class", "class")
        if entry.get("dtype") is not None:
            float_dtype(entry["dtype"], file, f"{field}.dtype")
    for name, dtype in _table(meta.get("dtypes") or {}, file, "dtypes").items():
        check_component_name(name, f"{file}: dtypes")
        if dtype is not None:
            float_dtype(dtype, file, _key("dtypes", name))


def _is_pipeline_module(name: str) -> bool:
    """Whether diffusers ships a pipeline subpackage ``name`` (looked up on disk: diffusers is not imported)."""
    spec = importlib.util.find_spec("diffusers")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    return any((Path(r) / "pipelines" / name / "__init__.py").is_file() for r in roots)


def validate_model_index(index: Any, file: Path) -> dict[str, tuple[str | None, str | None]]:
    """Check ``model_index.json`` before diffusers reads it (diffusers imports the library each component names,
    and loads ``<class>.py`` code for a list-valued ``_class_name``). Returns ``{component: (library, class)}``."""
    index = _table(index, file, "(the whole file)")
    cls = index.get("_class_name")
    if isinstance(cls, list):
        _fail(file, "_class_name", "is a list: a custom pipeline (code from the folder) is never loaded")
    _identifier(cls, file, "_class_name", "pipeline class")
    components: dict[str, tuple[str | None, str | None]] = {}
    for name, value in index.items():
        if name.startswith("_"):
            if not _plain_value(value):
                _fail(file, _key("", name), f"must be a plain value, not {_kind(value)}")
            continue
        if not (isinstance(value, list) and len(value) == 2):
            continue  # a pipeline config value (requires_safety_checker, ...), not a component
        check_component_name(name, str(file))
        if not all(v is None or isinstance(v, str) for v in value):
            _fail(file, _key("", name), "must be a [library, class] pair of strings (or nulls)")
        lib, class_name = value
        if lib is not None and lib not in COMPONENT_LIBRARIES:
            if not (_IDENTIFIER.fullmatch(lib) and _is_pipeline_module(lib)):
                _bad_value(
                    file,
                    f"{_key('', name)}[0]",
                    lib,
                    f"is not an allowed library ({', '.join(COMPONENT_LIBRARIES)} or a diffusers pipeline module)",
                )
        if class_name is not None:
            _identifier(class_name, file, f"{_key('', name)}[1]", "class")
        components[name] = (lib, class_name)
    return components
