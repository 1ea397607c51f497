"""vqsuite.fileio: output folders are replaced only when vqsuite wrote every file in them (manifest, or an older
vqsuite's known names), and saves killed at any point are recovered by the next save or load of the path; folders
that only look like vqsuite's hidden temporaries are never touched."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import vqsuite
from vqsuite.fileio import (
    LOCK_FORMAT,
    MANIFEST_NAME,
    OutputInUseError,
    atomic_folder,
    read_manifest,
    recover_interrupted_save,
    replace_problem,
)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def _output(path: Path, kind: str, files: dict[str, bytes], record: str | None = None) -> Path:
    with atomic_folder(path, kind=kind, record=record) as tmp:
        _write(tmp, files)
    return path


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    return vqsuite.quantize_model(net, "w8a8")


def _float() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _same(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock(tmp: Path, target: str, pid: int) -> Path:
    """The lock file ``atomic_folder`` writes beside its temporary folder, naming process ``pid`` here."""
    lock = tmp.parent / f"{tmp.name}.lock"
    info = {"format": LOCK_FORMAT, "target": target, "pid": pid, "host": socket.gethostname(), "started": time.time()}
    lock.write_text(json.dumps(info))
    return lock


CK = {"model.safetensors": b"w" * 64, "vqsuite_config.json": b"{}"}
GEN = {"000.png": b"p" * 32, "grid.png": b"g" * 32, "generate.json": b"{}"}


# ---------------------------------------------------------------------------- replace_problem
def _legacy(files: dict[str, bytes]) -> Callable[[Path], None]:
    return lambda d: (d.mkdir(), _write(d, files))


def _own_plus(kind: str, files: dict[str, bytes], extra: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        _output(d, kind, files, record="generate.json" if kind == "generate" else None)
        extra(d)

    return make


# (id, how the folder is made, kinds the caller writes, None = replaceable / text the refusal must contain)
PROBLEMS: list[tuple[str, Callable[[Path], None], str | tuple[str, ...] | None, str | None]] = [
    ("absent", lambda d: None, "generate", None),
    ("empty", lambda d: d.mkdir(), "generate", None),
    ("own-checkpoint", _own_plus("checkpoint", CK, lambda d: None), "checkpoint", None),
    ("own-generate-record", _own_plus("generate", GEN, lambda d: None), "generate", None),
    ("foreign", _legacy({"holiday.png": b"x"}), None, "not written by vqsuite"),
    (
        "user-file",
        _own_plus("checkpoint", CK, lambda d: (d / "notes.txt").write_text("mine")),
        "checkpoint",
        "holds notes.txt, which was not written by vqsuite",
    ),
    (
        "user-file-deep",
        _own_plus("checkpoint", {**CK, "unet/model.safetensors": b"u"}, lambda d: (d / "unet/a.txt").write_text("m")),
        "checkpoint",
        "holds unet/a.txt",
    ),
    (
        "user-folder",
        _own_plus("checkpoint", CK, lambda d: (d / "mine").mkdir()),
        "checkpoint",
        "holds the folder mine",
    ),
    (
        "changed-file",
        _own_plus("generate", GEN, lambda d: (d / "000.png").write_bytes(b"my own drawing")),
        "generate",
        "000.png, which was changed after vqsuite wrote it",
    ),
    (
        "generate-onto-checkpoint",
        _own_plus("checkpoint", CK, lambda d: None),
        "generate",
        "is a quantized checkpoint folder (vqsuite quantize), not a generate output folder (vqsuite generate)",
    ),
    (
        "quantize-onto-generate",
        _own_plus("generate", GEN, lambda d: None),
        ("checkpoint", "pipeline"),
        "is a generate output folder (vqsuite generate), not a quantized checkpoint folder",
    ),
    ("legacy-generate", _legacy(GEN), "generate", None),
    ("legacy-checkpoint", _legacy({**CK, "report.txt": b"r"}), "checkpoint", None),
    (
        "legacy-with-user-file",
        _legacy({**GEN, "holiday.jpg": b"j"}),
        "generate",
        "(written by an older vqsuite, without a manifest) holds holiday.jpg, which a generate output folder",
    ),
    (
        "legacy-kind-mismatch",
        _legacy(GEN),
        "checkpoint",
        "is a generate output folder (vqsuite generate), not a quantized checkpoint folder",
    ),
    (
        "legacy-pipeline-unknown-component",
        _legacy(
            {
                "vqsuite_pipeline.json": b"{}",
                "model_index.json": b'{"unet": ["diffusers", "UNet2DConditionModel"]}',
                "unet/config.json": b"{}",
                "photos/config.json": b"{}",
            }
        ),
        "pipeline",
        "holds photos/config.json",
    ),
    (
        "legacy-demo-per-preset",
        _legacy({"w8a8/demo.json": b"{}", "w8a8/grid.png": b"g", "w8a8/fp/00000.png": b"f"}),
        "demo",
        None,
    ),
]


@pytest.mark.parametrize("make, kinds, needle", [c[1:] for c in PROBLEMS], ids=[c[0] for c in PROBLEMS])
def test_replace_problem(tmp_path: Path, make, kinds, needle) -> None:  # noqa: ANN001 - table entries
    target = tmp_path / "out"
    make(target)
    problem = replace_problem(target, kinds)
    if needle is None:
        assert problem is None
    else:
        assert problem is not None and needle in problem, problem


@pytest.mark.parametrize("make, kinds, needle", [c[1:] for c in PROBLEMS if c[3]], ids=[c[0] for c in PROBLEMS if c[3]])
def test_atomic_folder_refuses_and_deletes_nothing(tmp_path: Path, make, kinds, needle) -> None:  # noqa: ANN001
    target = tmp_path / "out"
    make(target)
    before = _snapshot(target)
    with pytest.raises(OutputInUseError, match="refusing to replace it"):
        with atomic_folder(target, kind=kinds) as tmp:
            (tmp / "new.bin").write_bytes(b"n")
    assert _snapshot(target) == before
    assert _hidden(tmp_path) == []


def test_manifest_lists_every_file_and_replacing_removes_only_them(tmp_path: Path) -> None:
    out = _output(tmp_path / "out", "checkpoint", {**CK, "sub/x.bin": b"xx"})
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["kind"] == "checkpoint" and m["files"] == {
        "model.safetensors": 64,
        "vqsuite_config.json": 2,
        "sub/x.bin": 2,
    }
    assert m["dirs"] == ["sub"]
    _output(out, "checkpoint", CK)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [MANIFEST_NAME, *sorted(CK)]
    assert _hidden(tmp_path) == []


def test_record_holds_the_manifest(tmp_path: Path) -> None:
    out = _output(tmp_path / "out", "generate", {**GEN, "generate.json": b'{"images": []}'}, record="generate.json")
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "generate.json", "grid.png"]
    record = json.loads((out / "generate.json").read_text())
    assert record["images"] == [] and read_manifest(out)["kind"] == "generate"
    assert replace_problem(out, "generate") is None


def test_library_save_refuses_checkpoint_with_user_file(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    vqsuite.save_quantized(_model(), ck)
    (ck / "notes.txt").write_text("my notes")
    before = _snapshot(ck)
    with pytest.raises(OutputInUseError, match="holds notes.txt"):
        vqsuite.save_quantized(_model(1), ck)
    assert _snapshot(ck) == before and _hidden(tmp_path) == []


# ---------------------------------------------------------------------------- interrupted saves
def test_failed_second_rename_puts_the_previous_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = tmp_path / "ck"
    first = _model()
    vqsuite.save_quantized(first, ck)
    before = _snapshot(ck)
    real = os.replace
    calls = []

    def replace(src, dst):  # noqa: ANN001 - os.replace's signature
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real(src, dst)

    monkeypatch.setattr("vqsuite.fileio.os.replace", replace)
    with pytest.raises(OSError, match="disk went away"):
        vqsuite.save_quantized(_model(1), ck)
    monkeypatch.undo()
    assert _snapshot(ck) == before and _hidden(tmp_path) == []
    assert _same(vqsuite.load_quantized(ck, model=_float()), first)


_KILLED_SAVE = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch import nn
    import vqsuite
    import vqsuite.fileio

    def model(seed):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
        return vqsuite.quantize_model(net, "w8a8")

    ck = sys.argv[1]
    vqsuite.save_quantized(model(0), ck)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == int(sys.argv[2]):
            os._exit(9)  # killed: no handler, no cleanup
        return real(src, dst)

    vqsuite.fileio.os.replace = replace
    vqsuite.save_quantized(model(1), ck)
    """
)


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Folders holding ``ck`` as left by a process killed at its 1st / 2nd ``os.replace`` of a second save (one
    subprocess each, run once; tests copy them)."""
    made = {}
    for at_rename in (1, 2):
        root = tmp_path_factory.mktemp(f"killed-{at_rename}")
        proc = subprocess.run(
            [sys.executable, "-c", _KILLED_SAVE, str(root / "ck"), str(at_rename)], capture_output=True
        )
        assert proc.returncode == 9, proc.stderr.decode()
        made[at_rename] = root
    return made


def _killed_save(killed_saves: dict[int, Path], at_rename: int, dest: Path) -> Path:
    """Save ``ck`` (seed 0), then save again (seed 1) in a process killed at its ``at_rename``-th ``os.replace``;
    returns ``dest / "ck"``."""
    for entry in killed_saves[at_rename].iterdir():
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, dest / entry.name)
    return dest / "ck"


@pytest.mark.parametrize("how", ["load", "info", "save"])
def test_save_killed_between_renames_is_rolled_back(
    killed_saves: dict[int, Path],
    tmp_path: Path,
    how: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ck = _killed_save(killed_saves, 2, tmp_path)  # after "ck -> .ck.old-X", before ".ck.tmp-X -> ck"
    assert not ck.exists()
    left = _hidden(tmp_path)
    assert [n.split("-")[0] for n in left] == [".ck.old", ".ck.tmp", ".ck.tmp"], left  # + the lock
    caplog.set_level(logging.WARNING, logger="vqsuite.fileio")
    if how == "load":
        assert _same(vqsuite.load_quantized(ck, model=_float()), _model(0))
    elif how == "info":
        from vqsuite.cli.main import main

        assert main(["info", str(ck)]) == 0
        assert "quantized layers" in capsys.readouterr().out
    else:
        vqsuite.save_quantized(_model(2), ck)
        assert _same(vqsuite.load_quantized(ck, model=_float()), _model(2))
    text = caplog.text
    assert "an interrupted save left the previous version of" in text and "it was restored" in text, text
    assert "an unfinished save to" in text, text
    assert _hidden(tmp_path) == []
    if how != "save":
        assert _same(vqsuite.load_quantized(ck, model=_float()), _model(0))  # rolled back: the previous one


def test_save_killed_while_writing_leaves_a_temporary_the_next_save_removes(
    killed_saves: dict[int, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ck = _killed_save(killed_saves, 1, tmp_path)  # the new folder is written, nothing renamed yet
    caplog.set_level(logging.WARNING, logger="vqsuite.fileio")
    assert _same(vqsuite.load_quantized(ck, model=_float()), _model(0))
    assert _hidden(tmp_path) == []  # the load above already removed the abandoned temporary
    assert "an unfinished save to" in caplog.text


def test_abandoned_temporary_is_removed_by_the_next_save(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ck = tmp_path / "ck"
    vqsuite.save_quantized(_model(), ck)
    tmp = tmp_path / ".ck.tmp-0123abcd"
    _write(tmp, {"model.safetensors": b"half a fi"})
    _lock(tmp, "ck", _dead_pid())
    caplog.set_level(logging.WARNING, logger="vqsuite.fileio")
    vqsuite.save_quantized(_model(1), ck)
    assert _hidden(tmp_path) == []
    assert f"removed {tmp}, an unfinished save" in caplog.text


def test_temporary_of_a_running_save_is_left_alone(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    tmp = tmp_path / ".ck.tmp-0123abcd"
    _write(tmp, {"model.safetensors": b"being written"})
    lock = _lock(tmp, "ck", os.getpid())  # this very process: alive
    assert recover_interrupted_save(ck) == []
    vqsuite.save_quantized(_model(), ck)
    assert tmp.is_dir() and lock.is_file()


def test_previous_folder_left_beside_a_finished_save_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ck = tmp_path / "ck"
    vqsuite.save_quantized(_model(), ck)
    old = tmp_path / ".ck.old-0123abcd"
    _output(old, "checkpoint", CK)
    caplog.set_level(logging.WARNING, logger="vqsuite.fileio")
    vqsuite.load_quantized(ck, model=_float())
    assert not old.exists() and "the previous version of" in caplog.text


# (id, hidden name, its files, whether it carries vqsuite's marker but must still stay: a user file inside)
LOOKALIKES: list[tuple[str, str, dict[str, bytes]]] = [
    ("tmp-without-lock", ".ck.tmp-0123abcd", {"model.safetensors": b"mine"}),
    ("old-without-marker", ".ck.old-0123abcd", {"model.safetensors": b"mine", "notes.txt": b"n"}),
    ("other-name-tmp", ".ckpt.tmp-0123abcd", {"vqsuite_config.json": b"{}"}),
    ("pattern-not-exact", ".ck.old-0123abcdX", {"vqsuite_config.json": b"{}", "model.safetensors": b"m"}),
    ("pattern-not-hex", ".ck.tmp-zzzzzzzz", {"vqsuite_config.json": b"{}"}),
]


@pytest.mark.parametrize("name, files", [c[1:] for c in LOOKALIKES], ids=[c[0] for c in LOOKALIKES])
@pytest.mark.parametrize("ck_exists", [False, True], ids=["no-ck", "ck"])
def test_lookalike_folders_are_never_touched(
    tmp_path: Path, name: str, files: dict[str, bytes], ck_exists: bool
) -> None:
    ck = tmp_path / "ck"
    if ck_exists:
        vqsuite.save_quantized(_model(), ck)
    other = tmp_path / name
    _write(other, files)
    before = _snapshot(other)
    assert recover_interrupted_save(ck) == []
    if not ck_exists:
        with pytest.raises(vqsuite.CheckpointError, match="no checkpoint at"):
            vqsuite.load_quantized(ck, model=_float())
    vqsuite.save_quantized(_model(1), ck)
    vqsuite.load_quantized(ck, model=_float())
    assert _snapshot(other) == before
    assert _hidden(tmp_path) == [name]


def test_previous_folder_with_a_user_file_is_restored_but_never_emptied(tmp_path: Path) -> None:
    """A ``.ck.old-X`` with vqsuite's marker comes back as ``ck`` when ``ck`` is missing; beside an existing ``ck``
    only its listed files go, and a file the user put there stays (named in a warning)."""
    ck = tmp_path / "ck"
    vqsuite.save_quantized(_model(), ck)
    old = tmp_path / ".ck.old-0123abcd"
    _output(old, "checkpoint", CK)
    (old / "notes.txt").write_text("mine")
    recover_interrupted_save(ck)
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]


def test_a_damaged_manifest_never_deletes_outside_its_folder(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    vqsuite.save_quantized(_model(), ck)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    elsewhere = tmp_path / "elsewhere"
    _write(elsewhere, {"x.bin": b"keep"})
    old = tmp_path / ".ck.old-0123abcd"
    _write(old, {"vqsuite_config.json": b"{}"})
    (old / "linked").symlink_to(elsewhere)
    manifest = {"format": "vqsuite-manifest", "version": 1, "kind": "checkpoint", "dirs": ["..", "linked"]}
    manifest["files"] = {"../victim.txt": 4, str(victim): 4, "linked/x.bin": 4, "vqsuite_config.json": 2}
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    recover_interrupted_save(ck)
    assert victim.read_text() == "keep" and (elsewhere / "x.bin").read_bytes() == b"keep"
    assert sorted(p.name for p in old.iterdir()) == ["linked"]  # only its own listed files went
