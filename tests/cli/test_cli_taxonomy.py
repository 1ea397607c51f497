"""The CLI's error taxonomy: a user error is one line with exit code 2, a bug is one "internal error ... please
report" line with exit code 1, ``--debug`` adds the traceback; ``--device`` is refused before any work; a full disk
is one line naming what was being written; every message is one clean line (no ANSI codes, no control
characters)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from vqsuite.cli.errors import (
    EXIT_INTERNAL,
    EXIT_USAGE,
    MAX_MESSAGE_CHARS,
    CLIError,
    check_device,
    clean_text,
    one_line,
    user_error_line,
)
from vqsuite.cli.main import main
from vqsuite.errors import ConfigError, UserError

#: what safetensors 0.x raises when the disk fills during ``save_file`` (seen on a full tmpfs, safetensors 0.8)
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
#: torch.save's two writers on a full disk (seen on a full tmpfs, torch 2.x): the legacy one names ENOSPC, the zip one
#: does not
TORCH_LEGACY_FULL = "write(): fd 3 failed with No space left on device"
TORCH_ZIP_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def _err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------------------------------------ bug vs user error
@pytest.mark.parametrize(
    "exc",
    [ValueError("boom"), TypeError("boom"), KeyError("boom"), RuntimeError("boom"), AttributeError("boom"),
     OSError(errno.EIO, "boom")],
    ids=["ValueError", "TypeError", "KeyError", "RuntimeError", "AttributeError", "OSError-EIO"],
)  # fmt: skip
def test_library_bug_is_internal_error_exit_1(
    exc: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import vqsuite

    def broken() -> dict[str, str]:
        raise exc

    monkeypatch.setattr(vqsuite, "describe_presets", broken)
    assert main(["presets"]) == EXIT_INTERNAL
    lines = _err_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"vqsuite presets: internal error: {type(exc).__name__}: "), lines
    assert "boom" in lines[0]
    assert lines[0].endswith("this is a bug, please report it (rerun with --debug for the traceback)"), lines


def test_library_bug_in_a_real_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain ValueError from deep inside ``quantize`` (the library's validation would raise ConfigError/UserError)
    is a bug: exit 1, and nothing written."""
    import vqsuite.pipelines.modules as modules

    def broken(*a: object, **k: object) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(modules, "_rule_for", broken)
    out = tmp_path / "ck"
    assert main(["--quiet", "quantize", "timm:resnet18", "--preset", "w4a16", "--out", str(out)]) == EXIT_INTERNAL
    last = _err_lines(capsys)[-1]
    assert last.startswith("vqsuite quantize: internal error: ValueError: boom"), last
    assert "please report" in last
    assert not out.exists() and not list(tmp_path.iterdir())


def test_debug_prints_the_traceback_of_a_bug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import vqsuite

    def broken() -> dict[str, str]:
        raise ValueError("boom")

    monkeypatch.setattr(vqsuite, "describe_presets", broken)
    assert main(["presets", "--debug"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise ValueError("boom")' in err
    last = err.strip().splitlines()[-1]
    assert last == "vqsuite presets: internal error: ValueError: boom \u2014 this is a bug, please report it"


@pytest.mark.parametrize(
    "exc, needle",
    [
        (ConfigError("act_mode='x' must be one of ..."), "act_mode='x'"),
        (UserError("calib_data is empty"), "calib_data is empty"),
        (FileNotFoundError(2, "No such file or directory", "/x/y.txt"), "No such file or directory: '/x/y.txt'"),
        (PermissionError(13, "Permission denied", "/x"), "Permission denied"),
        (IsADirectoryError(21, "Is a directory", "/x"), "Is a directory"),
        (NotADirectoryError(20, "Not a directory", "/x/y"), "Not a directory"),
        (FileExistsError(17, "File exists", "/x"), "File exists"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system while writing"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded while writing"),
        (ModuleNotFoundError("No module named 'skimage'", name="skimage"), "pip install scikit-image"),
        (MemoryError(), "out of memory"),
    ],
    ids=["ConfigError", "UserError", "FileNotFound", "Permission", "IsADirectory", "NotADirectory", "FileExists",
         "EROFS", "EDQUOT", "missing-dependency", "MemoryError"],
)  # fmt: skip
def test_user_errors_are_one_line_exit_2(
    exc: Exception, needle: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import vqsuite

    def fails() -> dict[str, str]:
        raise exc

    monkeypatch.setattr(vqsuite, "describe_presets", fails)
    assert main(["presets"]) == EXIT_USAGE
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("vqsuite presets: error: ") and needle in lines[0], lines
    assert "internal error" not in lines[0] and "Traceback" not in lines[0]


def test_user_error_lines_of_the_library_types() -> None:
    from vqsuite.evals.inception import InceptionNotFoundError
    from vqsuite.zoo import AssetMissingError, UnknownZooEntryError

    for e in (AssetMissingError("pip install --no-deps x==1"), InceptionNotFoundError("no FID network")):
        assert user_error_line(e) == str(e)
    e = UnknownZooEntryError("no zoo entry 'x'; known: a, b")
    assert isinstance(e, KeyError) and isinstance(e, UserError)
    assert user_error_line(e) == "no zoo entry 'x'; known: a, b"  # not KeyError's quoted repr
    assert user_error_line(ModuleNotFoundError("No module named 'vqsuite.nope'", name="vqsuite.nope")) is None
    assert user_error_line(ValueError("a bug")) is None
    assert user_error_line(ImportError("cannot import name 'x' from 'diffusers'")) is None


def test_missing_dependency_names_the_pip_install() -> None:
    e = ModuleNotFoundError("No module named 'skimage'", name="skimage")
    line = user_error_line(e)
    assert line == (
        "this command needs the Python package 'scikit-image' (import skimage), which is not installed: "
        "pip install scikit-image"
    )
    assert user_error_line(ModuleNotFoundError("No module named 'foo.bar'", name="foo.bar")).endswith("pip install foo")


def test_one_cli_error_class() -> None:
    from vqsuite.cli import errors, models

    assert models.CLIError is errors.CLIError


def test_unknown_zoo_name_is_a_user_error_and_still_a_key_error() -> None:
    from vqsuite import zoo

    with pytest.raises(KeyError, match="no zoo entry"):
        zoo.load("no-such-entry")
    with pytest.raises(UserError, match="no zoo entry"):
        zoo.load("no-such-entry")


def test_eval_on_a_folder_without_images_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to quantize, run zero inputs and crash with an IndexError (reported as a bug)."""
    data = tmp_path / "data"
    (data / "cats").mkdir(parents=True)
    (data / "cats" / "notes.txt").write_text("no images here\n")
    out = tmp_path / "out"
    argv = ["eval", "timm:resnet18", "--preset", "w8a8", "--data", str(data), "--out", str(out)]
    assert main(argv) == EXIT_USAGE
    assert _err_lines(capsys)[-1] == f"vqsuite eval: error: --data {data} holds no images " + (
        "(.png, .jpg, .jpeg, .bmp, .webp, .tif, .tiff)"
    )
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ full disk
@pytest.mark.parametrize(
    "exc",
    [
        "safetensors",
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(TORCH_LEGACY_FULL),
    ],
    ids=["SafetensorError", "OSError-ENOSPC", "torch-legacy-RuntimeError"],
)
def test_full_disk_while_saving_is_one_line(
    exc: Exception | str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``save_quantized`` writes with safetensors' ``save_file``; a full disk there is one line naming ``--out``,
    exit code 2, and no half-written folder is left behind."""
    import safetensors.torch
    from safetensors import SafetensorError

    error = SafetensorError(SAFETENSORS_FULL) if exc == "safetensors" else exc

    def full_disk(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 64)  # a partial file, as a real full disk leaves
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "ck"
    assert main(["--quiet", "quantize", "timm:resnet18", "--preset", "w4a16", "--out", str(out)]) == EXIT_USAGE
    last = _err_lines(capsys)[-1]
    assert last == f"vqsuite quantize: error: no space left on device while writing {out}"
    assert not list(tmp_path.iterdir())  # neither --out nor a temporary folder


@pytest.mark.parametrize(
    "exc, expected",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device while writing OUT"),
        (RuntimeError(TORCH_LEGACY_FULL), "no space left on device while writing OUT"),
        (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "could not write OUT"),
        (RuntimeError(TORCH_ZIP_FULL), "could not write OUT (is the disk full?"),
        (RuntimeError("basic_ios::clear: iostream error"), "could not write OUT (is the disk full?"),
    ],
    ids=["ENOSPC", "torch-legacy", "torch-zip-stream", "torch-zip-pos", "torch-zip-ios"],
)
def test_disk_full_lines(exc: Exception, expected: str) -> None:
    assert user_error_line(exc, out="OUT").startswith(expected)


def test_full_disk_wrapped_by_another_error_and_named_by_filename() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/x.png")
        except OSError as inner:
            raise RuntimeError("saving the grid failed") from inner
    except RuntimeError as e:
        assert user_error_line(e) == "no space left on device while writing /data/x.png"
        assert user_error_line(e, out="results") == "no space left on device while writing results"


def test_a_context_hidden_by_from_none_is_not_searched() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise ValueError("a bug that swallowed the cause") from None
    except ValueError as e:
        assert user_error_line(e, out="OUT") is None


def test_torch_zip_failure_without_an_output_is_a_bug() -> None:
    """Without a command output to blame, an unexplained torch writer failure stays an internal error."""
    assert user_error_line(RuntimeError(TORCH_ZIP_FULL)) is None


# ------------------------------------------------------------------------------------------------ --device
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
_MPS = getattr(torch.backends, "mps", None)
NO_MPS = pytest.mark.skipif(_MPS is not None and _MPS.is_available(), reason="checks the refusal without Apple MPS")

BAD_DEVICES = [
    pytest.param("tpu", "'tpu' is not a device; use one of auto, cpu, cuda, cuda:N, mps", id="tpu"),
    pytest.param("cuda:x", "'cuda:x' is not a device", id="cuda-x"),
    pytest.param("gpu", "'gpu' is not a device (did you mean cuda?)", id="gpu"),
    pytest.param("cpu:0", "'cpu:0' is not a device", id="cpu-0"),
    pytest.param("", "'' is not a device", id="empty"),
    pytest.param("cuda", "cuda: no CUDA GPU on this machine", marks=NO_CUDA, id="cuda-without-gpu"),
    pytest.param("cuda:0", "cuda:0: no CUDA GPU on this machine", marks=NO_CUDA, id="cuda0-without-gpu"),
    pytest.param("mps", "mps: Apple MPS is not available", marks=NO_MPS, id="mps-unavailable"),
]
COMMANDS = {
    "generate": lambda out: ["generate", "mini-sd", "--prompt", "1", "--out", out],
    "quantize": lambda out: ["quantize", "timm:resnet18", "--out", out],
    "finetune": lambda out: ["finetune", "fmnist-vit", "--method", "ofq", "--out", out],
}


@pytest.mark.parametrize("device, needle", BAD_DEVICES)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_device_is_refused_before_any_work(
    command: str,
    device: str,
    needle: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib

    module = importlib.import_module(f"vqsuite.cli.{command}")

    def must_not_run(args: object) -> int:
        raise AssertionError("the command ran with a bad --device")

    monkeypatch.setattr(module, "run", must_not_run)
    out = tmp_path / "out"
    assert main([*COMMANDS[command](str(out)), "--device", device]) == EXIT_USAGE
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"vqsuite {command}: error: --device ") and needle in lines[0], lines
    assert not out.exists()


def test_every_command_with_a_device_flag_is_covered() -> None:
    from vqsuite.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    with_device = sorted(
        name for name, p in sub.choices.items() if any("--device" in a.option_strings for a in p._actions)
    )
    assert with_device == sorted(COMMANDS)


def test_check_device_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") == "cpu"
    assert check_device("cpu") == check_device(" CPU ") == "cpu"
    with pytest.raises(CLIError, match="--gpu-device cuda: no CUDA GPU"):
        check_device("cuda", flag="--gpu-device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("auto") == "cuda"
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(CLIError, match=r"--device cuda:2: this machine has 2 CUDA GPU\(s\) \(cuda:0..cuda:1\)"):
        check_device("cuda:2")


def test_resolved_device_reaches_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vqsuite.cli import quantize

    seen: list[str] = []
    monkeypatch.setattr(quantize, "run", lambda args: seen.append(args.device) or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["quantize", "timm:resnet18", "--out", str(tmp_path / "o")]) == 0
    assert main(["quantize", "timm:resnet18", "--out", str(tmp_path / "o"), "--device", "CPU"]) == 0
    assert seen == ["cpu", "cpu"]


# ------------------------------------------------------------------------------------------------ clean lines
@pytest.mark.parametrize(
    "raw, clean",
    [
        ("\x1b[31mred\x1b[0m text", "red text"),
        ("\x1b[1;38;5;196mbold\x1b[22m", "bold"),
        ("100%|\x1b[32m██████████\x1b[0m| 10/10\r\x1b[2K\x1b[Adone", "100%|██████████| 10/10 done"),
        ("\x1b]0;window title\x07after", "after"),
        ("bell\x07 and null\x00 and del\x7f and c1\x9b", "bell and null and del and c1"),
        ("two\nlines\tand\r\ncrlf", "two lines and crlf"),
        ("plain", "plain"),
        ("\x1b[", "["),  # a cut-off escape: the ESC goes, the bracket is just text
    ],
    ids=["colour", "256-colour", "tqdm", "osc-title", "controls", "whitespace", "plain", "cut-off"],
)
def test_clean_text(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean


def test_one_line_strips_ansi_from_exceptions_and_keeps_the_limit() -> None:
    assert one_line(ValueError("\x1b[33mWARNING\x1b[0m bad\nthing")) == "ValueError: WARNING bad thing"
    assert one_line(CLIError("\x1b[31m--out\x1b[0m is bad")) == "--out is bad"
    assert one_line(ConfigError("rank=-1 must be an integer >= 0")) == "rank=-1 must be an integer >= 0"
    long = one_line("\x1b[31m" + "x" * 1000)
    assert len(long) == MAX_MESSAGE_CHARS and long.endswith("...") and "\x1b" not in long


def test_ansi_in_an_error_never_reaches_the_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import vqsuite

    def fails() -> dict[str, str]:
        raise CLIError("\x1b[31mthe \x1b[1mpreset\x1b[0m\r\nfile is \x07broken")

    monkeypatch.setattr(vqsuite, "describe_presets", fails)
    assert main(["presets"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "vqsuite presets: error: the preset file is broken\n"
