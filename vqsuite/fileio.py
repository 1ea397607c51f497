"""Output folders that are safe by construction: vqsuite only ever deletes files it wrote itself.

Every folder vqsuite writes goes through :func:`atomic_folder`: the files are written into a hidden temporary
folder beside the target (``.NAME.tmp-XXXXXXXX``, announced by a lock file ``.NAME.tmp-XXXXXXXX.lock`` that names
the writing process), a *manifest* of what was written (relative paths and sizes, ``.vqsuite-manifest.json``, or
the ``vqsuite_manifest`` entry of the folder's own record such as ``generate.json``) is added, and the folder is
renamed into place. An existing folder at the target is replaced only when every entry in it is listed in its
manifest, unchanged (same size), or, for a folder written by an older vqsuite without a manifest, only when it
holds nothing but the files an output of its kind is known to contain (:data:`LEGACY_FILES`). The previous
folder is moved aside to ``.NAME.old-XXXXXXXX`` and then only its listed files are removed.

Interrupted saves are recovered by :func:`recover_interrupted_save`, which every save and every load of a path
runs first:

* ``.NAME.old-X`` and no ``NAME``: the save was killed between its two renames. The save never reported
  success, so it is rolled *back*: the previous folder is renamed to ``NAME`` again (the unfinished new one is
  discarded with the other temporaries). A save that did not finish never happened.
* ``.NAME.old-X`` beside ``NAME``: the save finished but was killed before removing the previous folder; its
  listed files are removed.
* ``.NAME.tmp-X`` whose lock names a process that is no longer running (or that holds a complete manifest): an
  unfinished write, removed.

Only entries matching those exact hidden names *and* carrying vqsuite's marker (the lock file of a temporary
folder; a manifest or a known marker file of a previous folder) are ever touched; each action is logged as a
warning.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vqsuite.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST_NAME = ".vqsuite-manifest.json"
MANIFEST_FORMAT = "vqsuite-manifest"
MANIFEST_VERSION = 1
#: the key under which a folder's own record (``generate.json``) may hold the manifest instead of a separate file
MANIFEST_KEY = "vqsuite_manifest"
#: records that may hold the manifest (checked when there is no :data:`MANIFEST_NAME`)
RECORD_NAMES = ("generate.json", "demo.json", "finetune.json")
LOCK_FORMAT = "vqsuite-partial-save"
#: a lock written on another machine (a shared disk) counts as abandoned after this long; saves take minutes
FOREIGN_LOCK_STALE_S = 3600.0
#: a lock whose process id is alive still counts as abandoned after this long (the id was reused)
LOCK_STALE_S = 24 * 3600.0

#: what each kind of output is, for messages
KINDS: dict[str, str] = {
    "checkpoint": "a quantized checkpoint folder (vqsuite quantize)",
    "pipeline": "a quantized pipeline folder (vqsuite quantize)",
    "generate": "a generate output folder (vqsuite generate)",
    "demo": "a demo output folder (vqsuite demo)",
    "finetune": "a finetune output folder (vqsuite finetune)",
    "output": "a vqsuite output folder",
}

#: marker file -> kind, first match wins (a finetune/qalora folder also holds vqsuite_pipeline.json)
MARKERS: tuple[tuple[str, str], ...] = (
    ("finetune.json", "finetune"),
    ("generate.json", "generate"),
    ("demo.json", "demo"),
    ("vqsuite_pipeline.json", "pipeline"),
    ("vqsuite_config.json", "checkpoint"),
)

# Files of each kind as written by vqsuite versions before manifests: relative paths matched segment by segment
# (fnmatch per segment; ``{component}`` is a component folder named in the folder's model_index.json).
_COMPONENT_FILES = tuple(
    f"{{component}}/{name}"
    for name in (
        "config.json",
        "model.safetensors",
        "vqsuite_config.json",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model*.safetensors",
        "model*.safetensors",
        "*.safetensors.index.json",
        "scheduler_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "spiece.model",
        "added_tokens.json",
        "preprocessor_config.json",
        "generation_config.json",
    )
)
_PIPELINE_FILES = ("model_index.json", "vqsuite_pipeline.json", "report.txt", "report.json", *_COMPONENT_FILES)
_DEMO_FILES = ("demo.json", "grid.png", "fp/[0-9]*.png", "quantized/[0-9]*.png")
LEGACY_FILES: dict[str, tuple[str, ...]] = {
    "checkpoint": ("model.safetensors", "vqsuite_config.json", "report.txt", "report.json"),
    "pipeline": _PIPELINE_FILES,
    "generate": (
        "generate.json",
        "grid.png",
        "compare_grid.png",
        "[0-9][0-9][0-9]*.png",
        "fp/[0-9][0-9][0-9]*.png",
        "compare/[0-9][0-9][0-9]*.png",
    ),
    # one preset at the top, or one folder per preset (``vqsuite demo --presets a,b``)
    "demo": (*_DEMO_FILES, *(f"*/{f}" for f in _DEMO_FILES)),
    "finetune": ("finetune.json", "model.safetensors", "qat_config.json", *_PIPELINE_FILES),
}


class OutputInUseError(UserError):
    """An output folder that vqsuite refuses to replace (it holds files vqsuite did not write); one line."""


# ----------------------------------------------------------------------------------------- small file helpers
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any, *, sort_keys: bool = True) -> None:
    """Write ``obj`` as JSON and fsync it (used inside an :func:`atomic_folder`)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------- manifests
def _entries(folder: Path) -> tuple[dict[str, int], list[str], list[str]]:
    """Everything under ``folder``: ({file: size}, [empty or non-empty dirs], [links and other odd entries]),
    relative POSIX paths; symbolic links are reported, never followed."""
    files: dict[str, int] = {}
    dirs: list[str] = []
    odd: list[str] = []
    for root, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(root)
        for d in list(dirnames):
            p = base / d
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                odd.append(rel)
                dirnames.remove(d)
            else:
                dirs.append(rel)
        for f in filenames:
            p = base / f
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink() or not p.is_file():
                odd.append(rel)
            else:
                files[rel] = p.stat().st_size
    return files, sorted(dirs), sorted(odd)


def infer_kind(folder: Path) -> str | None:
    """The kind of output a folder's marker files say it is (``None``: no vqsuite marker)."""
    for marker, kind in MARKERS:
        if (folder / marker).is_file():
            return kind
    if folder.is_dir() and any((sub / "demo.json").is_file() for sub in folder.iterdir() if sub.is_dir()):
        return "demo"  # one folder per preset
    return None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a folder vqsuite wrote (``None`` for a folder without one: foreign, or an older vqsuite's)."""
    m = _read_json(folder / MANIFEST_NAME) if (folder / MANIFEST_NAME).is_file() else None
    if m is None:
        for name in RECORD_NAMES:
            record = _read_json(folder / name) if (folder / name).is_file() else None
            if isinstance(record, dict) and isinstance(record.get(MANIFEST_KEY), dict):
                m = record[MANIFEST_KEY]
                break
    if isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT and isinstance(m.get("files"), dict):
        return m
    return None


def write_manifest(folder: Path, kind: str | None = None, record: str | None = None) -> dict[str, Any]:
    """List every file under ``folder`` in its manifest: ``.vqsuite-manifest.json``, or the ``vqsuite_manifest``
    entry of the JSON ``record`` (a dict) when given. ``kind`` defaults to what the marker files say."""
    files, dirs, odd = _entries(folder)
    if odd:
        raise OSError(f"{folder / odd[0]} is a link or special file; vqsuite writes only plain files")
    files.pop(MANIFEST_NAME, None)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "kind": kind or infer_kind(folder) or "output",
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
        "dirs": dirs,
    }
    if record is None:
        write_json(folder / MANIFEST_NAME, manifest)
        return manifest
    obj = _read_json(folder / record)
    if not isinstance(obj, dict):
        raise ValueError(f"{folder / record} is not a JSON object; cannot record the manifest in it")
    manifest["files"][record] = None  # rewritten below: its size is not known until then
    obj[MANIFEST_KEY] = manifest
    write_json(folder / record, obj, sort_keys=False)
    return manifest


def _matches(rel: str, pattern: str, components: set[str]) -> bool:
    parts, pats = rel.split("/"), pattern.split("/")
    if len(parts) != len(pats):
        return False
    for part, pat in zip(parts, pats):
        if pat == "{component}":
            if part not in components:
                return False
        elif not fnmatch.fnmatchcase(part, pat):
            return False
    return True


def _components(folder: Path) -> set[str]:
    index = _read_json(folder / "model_index.json")
    if not isinstance(index, dict):
        return set()
    return {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}


def _legacy_problem(folder: Path, kind: str) -> str | None:
    files, dirs, odd = _entries(folder)
    if odd:
        return f"holds {odd[0]}, a link or special file vqsuite never writes"
    comps = _components(folder)
    patterns = LEGACY_FILES.get(kind, ())
    for rel in sorted(files):
        if not any(_matches(rel, p, comps) for p in patterns):
            return (
                f"(written by an older vqsuite, without a manifest) holds {rel}, which {KINDS[kind]} does not contain"
            )
    used = {str(Path(rel).parent.as_posix()) for rel in files}
    for d in dirs:
        if not any(u == d or u.startswith(d + "/") for u in used):
            return f"(written by an older vqsuite, without a manifest) holds the empty folder {d}"
    return None


def folder_kind(folder: Path) -> str | None:
    """What kind of vqsuite output ``folder`` is: its manifest's kind, else its marker's (``None``: not vqsuite's)."""
    m = read_manifest(folder)
    if m is not None:
        return str(m.get("kind") or "output")
    return infer_kind(folder)


def replace_problem(folder: str | os.PathLike, kinds: str | tuple[str, ...] | None = None) -> str | None:
    """Why replacing ``folder`` would delete something vqsuite did not write, or ``None`` when it would not.

    The answer is a phrase that follows the folder's path (``"holds notes.txt, which ..."``). An absent or empty
    folder is always fine. ``kinds``: the kinds of output the caller writes; a folder of another kind is refused
    too (``generate`` never replaces a checkpoint with images).
    """
    folder = Path(folder)
    if folder.is_symlink():
        return "is a symbolic link; vqsuite replaces only a real folder"
    if not folder.exists():
        return None
    if not folder.is_dir():
        return "is an existing file, not a folder"
    if not any(folder.iterdir()):
        return None
    kind = folder_kind(folder)
    if kind is None:
        return "is not empty and was not written by vqsuite"
    wanted = (kinds,) if isinstance(kinds, str) else kinds
    if wanted and kind not in wanted:
        return f"is {KINDS.get(kind, KINDS['output'])}, not {KINDS.get(wanted[0], KINDS['output'])}"
    manifest = read_manifest(folder)
    if manifest is None:
        return _legacy_problem(folder, kind)
    listed: dict[str, Any] = manifest["files"]
    listed_dirs = set(manifest.get("dirs") or ())
    files, dirs, odd = _entries(folder)
    if odd:
        return f"holds {odd[0]}, a link or special file vqsuite never writes"
    for rel, size in sorted(files.items()):
        if rel == MANIFEST_NAME:
            continue
        if rel not in listed:
            return f"holds {rel}, which was not written by vqsuite (it is not in the folder's manifest)"
        if listed[rel] is not None and listed[rel] != size:
            return f"holds {rel}, which was changed after vqsuite wrote it ({size} bytes, {listed[rel]} written)"
    for d in dirs:
        if d not in listed_dirs:
            return f"holds the folder {d}, which was not written by vqsuite (it is not in the folder's manifest)"
    return None


def _inside(rel: Any) -> bool:
    """A manifest entry that names a path inside its folder (never ``..``, absolute or odd: a damaged or hostile
    manifest must not delete anything elsewhere)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def remove_output(folder: Path) -> bool:
    """Delete the files vqsuite wrote in ``folder`` (its manifest's, or those of a checked older output) and the
    folder when that leaves it empty; anything else stays and is named in a warning. Returns whether it is gone."""
    if not any(folder.iterdir()):
        folder.rmdir()
        return True
    manifest = read_manifest(folder)
    if manifest is None:
        kind = infer_kind(folder)
        problem = "is not a vqsuite output" if kind is None else _legacy_problem(folder, kind)
        if problem is None:
            shutil.rmtree(folder)
            return True
        logger.warning("left %s in place: it %s", folder, problem)
        return False
    root = folder.resolve()
    for rel in filter(_inside, manifest["files"]):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            p = folder / rel
            if not p.is_symlink() and p.resolve().is_relative_to(root):  # never through a linked folder
                p.unlink()
    with contextlib.suppress(FileNotFoundError):
        (folder / MANIFEST_NAME).unlink()
    for d in sorted(filter(_inside, manifest.get("dirs") or ()), key=lambda s: -s.count("/")):
        with contextlib.suppress(OSError):
            (folder / d).rmdir()  # only when empty
    try:
        folder.rmdir()
        return True
    except OSError:
        left = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
        logger.warning("left %s in place: it holds %s, which vqsuite did not write", folder, left[0] if left else "?")
        return False


# ----------------------------------------------------------------------------------------- interrupted saves
def _hidden_names(name: str) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    n = re.escape(name)
    return (
        re.compile(rf"\.{n}\.tmp-([0-9a-f]{{8}})"),
        re.compile(rf"\.{n}\.tmp-([0-9a-f]{{8}})\.lock"),
        re.compile(rf"\.{n}\.old-([0-9a-f]{{8}})"),
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _writer_alive(lock: dict[str, Any]) -> bool:
    """Whether the process that wrote ``lock`` may still be saving."""
    age = time.time() - float(lock.get("started") or 0)
    if lock.get("host") != socket.gethostname():
        return age < FOREIGN_LOCK_STALE_S
    pid = lock.get("pid")
    return isinstance(pid, int) and age < LOCK_STALE_S and _pid_alive(pid)


def _is_lock(obj: Any, name: str) -> bool:
    return isinstance(obj, dict) and obj.get("format") == LOCK_FORMAT and obj.get("target") == name


def _is_previous_output(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and folder_kind(folder) is not None


def recover_interrupted_save(path: str | os.PathLike) -> list[str]:
    """Clean up after a save to ``path`` that was killed; returns what was done (each also logged as a warning).

    See the module docstring for the rules. Called first by every save (:func:`atomic_folder`) and every load of
    a checkpoint or pipeline folder, so ``load_quantized``/``vqsuite info`` of a path that only exists as
    ``.NAME.old-X`` finds it restored.
    """
    path = Path(path)
    parent, name = path.parent, path.name
    if not name or not parent.is_dir():
        return []
    tmp_re, lock_re, old_re = _hidden_names(name)
    tmps: dict[str, Path] = {}
    locks: dict[str, Path] = {}
    olds: list[Path] = []
    try:
        listing = list(parent.iterdir())
    except OSError:
        return []
    for entry in listing:
        if m := tmp_re.fullmatch(entry.name):
            tmps[m.group(1)] = entry
        elif m := lock_re.fullmatch(entry.name):
            locks[m.group(1)] = entry
        elif old_re.fullmatch(entry.name) and _is_previous_output(entry):
            olds.append(entry)
    done: list[str] = []

    def note(msg: str) -> None:
        logger.warning("%s", msg)
        done.append(msg)

    live: set[str] = set()
    for token, lock in locks.items():
        obj = _read_json(lock)
        if _is_lock(obj, name) and _writer_alive(obj):
            live.add(token)
    if olds and not path.exists() and not path.is_symlink() and not live:
        olds.sort(key=lambda p: p.stat().st_mtime)
        previous = olds.pop()
        os.replace(previous, path)
        _fsync_dir(parent)
        note(f"an interrupted save left the previous version of {path} at {previous}; it was restored to {path}")
    if path.exists():
        for old in olds:
            if remove_output(old):
                note(f"removed {old}, the previous version of {path} left behind by an interrupted save")
    for token, tmp in tmps.items():
        if token in live or not tmp.is_dir() or tmp.is_symlink():
            continue
        lock = locks.get(token)
        ours = (lock is not None and _is_lock(_read_json(lock), name)) or read_manifest(tmp) is not None
        if ours:
            shutil.rmtree(tmp, ignore_errors=True)
            note(f"removed {tmp}, an unfinished save to {path} left behind by an interrupted run")
    for token, lock in locks.items():  # a lock whose folder is gone (removed above, or never created)
        if token not in live and _is_lock(_read_json(lock), name) and not (parent / lock.name[:-5]).exists():
            lock.unlink(missing_ok=True)
    return done


# ----------------------------------------------------------------------------------------- atomic folder
@contextlib.contextmanager
def atomic_folder(
    path: str | os.PathLike, *, kind: str | tuple[str, ...] | None = None, record: str | None = None
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` by rename, on any error it
    is removed and an existing ``path`` is untouched. A crash never leaves a half-written folder at ``path``.

    ``kind`` (one kind of :data:`KINDS`, or several: the first is recorded) is what the folder is; an existing
    folder of another kind is refused (``OutputInUseError``), as is one holding anything vqsuite did not write
    (:func:`replace_problem`), both before the caller writes anything and again just before the replacement.
    ``record``: a JSON file the caller writes into the folder, which then holds the manifest (``generate.json``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(path)
    problem = replace_problem(path, kind)
    if problem is not None:
        raise OutputInUseError(f"{path} {problem}; refusing to replace it")
    token = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{token}"
    lock = path.parent / f".{path.name}.tmp-{token}.lock"
    info = {"format": LOCK_FORMAT, "target": path.name, "pid": os.getpid(), "host": socket.gethostname()}
    write_json(lock, {**info, "started": time.time()})
    old: Path | None = None
    try:
        tmp.mkdir()
        yield tmp
        write_manifest(tmp, kind if isinstance(kind, str) else (kind[0] if kind else None), record)
        _fsync_dir(tmp)
        if path.exists() or path.is_symlink():
            problem = replace_problem(path, kind)  # a file may have been added while the caller worked
            if problem is not None:
                raise OutputInUseError(f"{path} {problem}; refusing to replace it")
            old = path.parent / f".{path.name}.old-{token}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            moved, old = old, None
            try:
                remove_output(moved)
            except OSError as e:  # the save itself succeeded; the next save to this path retries the cleanup
                logger.warning("could not remove the previous version %s: %s", moved, e)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # the second rename failed: put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.unlink(missing_ok=True)
