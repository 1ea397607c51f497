"""Fine-tuning checkpoints without pickle: tensors in safetensors, everything else in JSON.

A nested state (an optimizer's ``state_dict``, a generator state, a loss history) is split by :func:`pack` into a
JSON tree, where every tensor is a reference ``{"__tensor__": key}``, and a flat ``{key: tensor}`` dict; tuples and
dicts with non-string keys are tagged so :func:`unpack` rebuilds them exactly. JSON cannot name a class or a
function, so loading a checkpoint never runs code.

:func:`write_checkpoint` stores one file: the tensors, plus the JSON and a sha256 of the tensor bytes in the
safetensors metadata, written to a temporary file beside the target, fsynced and renamed into place.
:func:`read_checkpoint` refuses, with one :class:`~vqsuite.pipelines.io.CheckpointError` line that never quotes the
file's bytes, a file that is not such a checkpoint (truncated, corrupt, of another format, an old pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch

from vqsuite.pipelines.io import CheckpointError

__all__ = [
    "CheckpointError",
    "check_child",
    "is_pickle",
    "pack",
    "read_checkpoint",
    "read_checkpoint_meta",
    "read_json",
    "tensor_digest",
    "unpack",
    "write_checkpoint",
]

#: metadata keys of a checkpoint file
META_FORMAT, META_VERSION, META_STATE, META_DIGEST = "format", "version", "state", "sha256"
#: a safetensors header is at most this large (the library's own limit)
MAX_HEADER = 100_000_000
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


# ------------------------------------------------------------------------------------------------ JSON <-> tensors
def pack(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as a JSON tree; its tensors go into ``tensors`` under ``prefix/<path>`` (CPU, contiguous, cloned)."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        if key in tensors:
            raise ValueError(f"duplicate tensor key {key!r}")
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [pack(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not ({_TENSOR, _TUPLE, _ITEMS} & set(obj)):
            return {k: pack(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        items = []
        for i, (k, v) in enumerate(obj.items()):
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"cannot store a dict key of type {type(k).__name__} at {prefix}")
            items.append([k, pack(v, f"{prefix}/{i}", tensors)])
        return {_ITEMS: items}
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix} in a checkpoint (tensors and JSON values only)")


def unpack(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack`; a reference to a tensor the file does not hold is a :class:`CheckpointError`."""
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if set(tree) == {_TENSOR}:
        key = tree[_TENSOR]
        if not isinstance(key, str) or key not in tensors:
            raise CheckpointError("the checkpoint's JSON refers to a tensor it does not hold")
        return tensors[key]
    if set(tree) == {_TUPLE} and isinstance(tree[_TUPLE], list):
        return tuple(unpack(v, tensors) for v in tree[_TUPLE])
    if set(tree) == {_ITEMS} and isinstance(tree[_ITEMS], list):
        if not all(isinstance(kv, list) and len(kv) == 2 for kv in tree[_ITEMS]):
            raise CheckpointError("the checkpoint's JSON holds a malformed mapping")
        return {k: unpack(v, tensors) for k, v in tree[_ITEMS]}
    return {k: unpack(v, tensors) for k, v in tree.items()}


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ files
def is_pickle(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a ``torch.save`` zip archive or a raw pickle (read, never unpickled)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict, fmt: str, version: int):
    """Write ``tensors`` + ``state`` (JSON-able) as one safetensors file, atomically (temp file + fsync + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        META_FORMAT: fmt,
        META_VERSION: str(version),
        META_STATE: json.dumps(state, allow_nan=True),
        META_DIGEST: tensor_digest(tensors),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _header(path: Path, what: str) -> dict:
    """The safetensors header of ``path`` (checked by hand: the file's bytes are never echoed)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{what} {path} is truncated or not a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{what} {path} is truncated or not a safetensors file")
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{what} {path} cannot be read ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} {path} is not a safetensors file")
    return header


def read_checkpoint_meta(path: str | os.PathLike, fmt: str, version: int, what: str = "checkpoint") -> dict[str, Any]:
    """The JSON state of a checkpoint written by :func:`write_checkpoint`, from its header only (no tensors read).

    Refuses an old pickle checkpoint without reading it past its first bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    if is_pickle(path):
        raise CheckpointError(
            f"{what} {path} is in the old pickle format, which vqsuite no longer loads (loading it could run code); "
            "restart without --resume (resume=False)"
        )
    meta = _header(path, what).get("__metadata__")
    if not isinstance(meta, dict) or meta.get(META_FORMAT) != fmt:
        raise CheckpointError(f"{what} {path} is not a {fmt} checkpoint")
    if meta.get(META_VERSION) != str(version):
        raise CheckpointError(f"{what} {path} has format version {str(meta.get(META_VERSION))[:20]!r}; this vqsuite "
                              f"reads version {version}")  # fmt: skip
    try:
        state = json.loads(meta.get(META_STATE, ""))
    except ValueError:
        raise CheckpointError(f"{what} {path}: its JSON state is corrupt") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} {path}: its JSON state is not an object")
    return state


def read_checkpoint(
    path: str | os.PathLike, fmt: str, version: int, what: str = "checkpoint"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(state, tensors)`` of a checkpoint written by :func:`write_checkpoint`; the tensors' sha256 is checked."""
    from safetensors.torch import load_file

    state = read_checkpoint_meta(path, fmt, version, what)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt payloads
        raise CheckpointError(f"{what} {path}: its tensors cannot be read ({type(e).__name__})") from None
    meta = _header(Path(path), what)["__metadata__"]
    if meta.get(META_DIGEST) != tensor_digest(tensors):
        raise CheckpointError(f"{what} {path} is corrupt (its tensors do not match the checksum written with them)")
    return state, tensors


def read_json(path: Path, what: str) -> Any:
    """A JSON file of a checkpoint; missing or corrupt is one :class:`CheckpointError` line (contents not quoted)."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} cannot be read ({type(e).__name__})") from None


def check_child(folder: Path, name: Any, pattern: str, what: str) -> Path:
    """``folder / name`` when ``name`` is a plain child name matching ``pattern`` that stays inside ``folder``
    (symlinks resolved); else one :class:`CheckpointError` line that does not repeat the name."""
    if not isinstance(name, str) or not re.fullmatch(pattern, name):
        raise CheckpointError(f"{what} does not name a checkpoint folder inside {folder} (expected {pattern})")
    child = folder / name
    try:
        inside = child.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):  # symlink loops
        inside = False
    if not inside:
        raise CheckpointError(f"{what} points outside {folder} (a symlink); refused")
    return child
