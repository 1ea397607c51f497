"""User errors of the ``vqsuite`` command: one line on stderr, exit code 2, no traceback (``--debug`` shows it).

Also the guards every command runs *before* any expensive work: output folders that must not be overwritten,
prompt files, numeric ranges. A check that fails late (after minutes of calibration) is a check done wrong.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

#: exit code of a user error (also argparse's)
EXIT_USAGE = 2
#: exit code of an unexpected internal error (a bug: rerun with --debug and report the traceback)
EXIT_INTERNAL = 1
#: longest error line printed (a library message can be long; the line must stay readable)
MAX_MESSAGE_CHARS = 400

#: files that mark a folder as written by vqsuite (what kind of output it is: ``vqsuite.fileio.MARKERS``)
VQSUITE_MARKERS = ("vqsuite_config.json", "vqsuite_pipeline.json", "generate.json", "demo.json", "finetune.json")


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


def one_line(e: BaseException | str, *, with_type: bool = True) -> str:
    """The message of ``e`` squeezed onto one line, at most :data:`MAX_MESSAGE_CHARS` characters.

    ``with_type`` prefixes the exception's class name (useful for a library's error inside a CLI message), except
    for the CLI's own and checkpoint errors, whose messages are written for users.
    """
    if isinstance(e, BaseException):
        text = " ".join(str(e).split())
        if with_type and not isinstance(e, CLIError) and type(e).__name__ not in ("CheckpointError", "CLIError"):
            text = f"{type(e).__name__}: {text}" if text else type(e).__name__
        text = text or type(e).__name__
    else:
        text = " ".join(e.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


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
