"""``vqsuite finetune --resume`` with hostile or corrupt checkpoints: one line, exit 2, before any work, no code run
from the file, none of its bytes printed, nothing written; ``load_finetuned`` refuses the same way."""

from __future__ import annotations

import importlib
import json
import pickle
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_usage_error
from pickle_bait import Evil
from torch import nn

from vqsuite.cli import finetune as ft_cli
from vqsuite.cli.main import build_parser
from vqsuite.finetune.checkpoint import write_checkpoint
from vqsuite.pipelines.io import CheckpointError

ESC = "\x1b[31mred\x1b[0m"
OFQ_ARGS = ["--bits", "2", "--steps", "2", "--cga-steps", "1", "--batch-size", "8", "--no-progress"]


def _argv(out: Path, ck: Path) -> list[str]:
    return ["finetune", "--method", "ofq", "fmnist-vit", "--out", str(out), *OFQ_ARGS, "--checkpoint-dir", str(ck),
            "--resume"]  # fmt: skip


def _options(argv: list[str]) -> dict:
    from vqsuite.finetune import OFQOptions

    return asdict(OFQOptions(**ft_cli._ofq_options(build_parser().parse_args(argv))))


def _valid(ck: Path, argv: list[str]) -> Path:
    """An OFQ checkpoint whose options match ``argv`` (its tensors: one, the check stops before the model)."""
    from vqsuite.finetune.ofq import OFQ_CHECKPOINT_FORMAT, OFQ_CHECKPOINT_VERSION

    state = {"options": _options(argv), "step": 1, "history": [{"loss": 1.0}], "wall_s": 0.1}
    return write_checkpoint(ck / ft_cli.OFQ_CHECKPOINT, {"x": torch.arange(64.0)}, state, OFQ_CHECKPOINT_FORMAT,
                            OFQ_CHECKPOINT_VERSION)  # fmt: skip


def _ofq_pickle(ck: Path, argv: list[str], marker: Path) -> None:
    (ck / ft_cli.OFQ_CHECKPOINT).write_bytes(pickle.dumps(Evil(marker)))


def _ofq_torch_save(ck: Path, argv: list[str], marker: Path) -> None:
    torch.save({"options": {}, "model": Evil(marker)}, ck / ft_cli.OFQ_CHECKPOINT)


def _ofq_legacy(ck: Path, argv: list[str], marker: Path) -> None:  # only the old ofq.pt (pickle) is there
    torch.save({"options": _options(argv), "x": Evil(marker)}, ck / ft_cli.OFQ_LEGACY_CHECKPOINT)


def _ofq_truncated(ck: Path, argv: list[str], marker: Path) -> None:
    f = _valid(ck, argv)
    f.write_bytes(f.read_bytes()[:-40])


def _ofq_flipped(ck: Path, argv: list[str], marker: Path) -> None:
    f = _valid(ck, argv)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x55
    f.write_bytes(bytes(data))


def _ofq_garbage(ck: Path, argv: list[str], marker: Path) -> None:
    (ck / ft_cli.OFQ_CHECKPOINT).write_bytes(ESC.encode() * 20)


OFQ_CASES: dict[str, tuple[Callable[[Path, list[str], Path], None], str]] = {
    "pickle-as-checkpoint": (_ofq_pickle, "old pickle format"),
    "torch-save-as-checkpoint": (_ofq_torch_save, "old pickle format"),
    "legacy-ofq-pt": (_ofq_legacy, "old pickle format, which vqsuite no longer loads"),
    "truncated": (_ofq_truncated, "tensors cannot be read"),
    "flipped-byte": (_ofq_flipped, "checksum"),
    "garbage": (_ofq_garbage, "not a safetensors file"),
}


@pytest.mark.parametrize("case", list(OFQ_CASES))
def test_ofq_resume_refuses_in_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck, out, marker = tmp_path / "ck", tmp_path / "out", tmp_path / "pwned"
    ck.mkdir()
    argv = _argv(out, ck)
    make, needle = OFQ_CASES[case]
    make(ck, argv, marker)
    assert_one_line_usage_error(argv, needle, capsys)
    assert not marker.exists() and not out.exists()


def test_ofq_legacy_message_says_restart_without_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    argv = _argv(tmp_path / "out", ck)
    _ofq_legacy(ck, argv, tmp_path / "pwned")
    assert_one_line_usage_error(argv, "restart without --resume", capsys)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------ qalora
ql = importlib.import_module("vqsuite.finetune.qalora")


def _qalora_checkpoint(folder: Path) -> None:
    trainable = {"a": nn.Parameter(torch.randn(3, 2))}
    optim = torch.optim.AdamW(list(trainable.values()), lr=1e-3)
    state = {"signature": {}, "updates": 1, "loss_curve": [0.5], "wall_s": 1.0}
    ql._save_checkpoint(folder, 1, trainable, optim, state, torch.zeros(1, 4))


def _latest(dir_value) -> Callable[[Path, Path], None]:
    return lambda ck, marker: (ck / ql.CKPT_LATEST).write_text(json.dumps({"dir": dir_value, "updates": 1}))


def _step_file(name: str, data: Callable[[bytes, Path], bytes]) -> Callable[[Path, Path], None]:
    def make(ck: Path, marker: Path) -> None:
        f = ck / "step-000001" / name
        f.write_bytes(data(f.read_bytes(), marker))

    return make


QALORA_CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "traversal": (_latest("../../etc"), "does not name a checkpoint folder"),
    "absolute": (_latest("/etc"), "does not name a checkpoint folder"),
    "ansi-name": (_latest(ESC), "does not name a checkpoint folder"),
    "latest-garbage": (lambda ck, m: (ck / ql.CKPT_LATEST).write_bytes(ESC.encode()), "cannot be read"),
    "optimizer-pickle": (_step_file(ql.CKPT_OPTIM, lambda b, m: pickle.dumps(Evil(m))), "refused unread"),
    "optimizer-corrupt": (_step_file(ql.CKPT_OPTIM, lambda b, m: b[: len(b) // 3]), "cannot be read"),
    "trainable-truncated": (_step_file(ql.CKPT_TRAINABLE, lambda b, m: b[:-3]), "truncated or corrupt"),
    "state-bad-json": (_step_file(ql.CKPT_STATE, lambda b, m: ESC.encode()), "cannot be read"),
    "missing-tensors": (lambda ck, m: (ck / "step-000001" / ql.CKPT_TENSORS).unlink(), "is missing"),
}


@pytest.mark.parametrize("case", list(QALORA_CASES))
def test_qalora_resume_refuses_in_one_line(
    case: str, tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck, out, marker = tmp_path / "ck", tmp_path / "out", tmp_path / "pwned"
    _qalora_checkpoint(ck)
    make, needle = QALORA_CASES[case]
    make(ck, marker)
    argv = ["finetune", "--method", "qalora", str(tiny_sd), "--out", str(out), "--steps", "2", "--checkpoint-dir",
            str(ck), "--resume", "--no-progress"]  # fmt: skip
    assert_one_line_usage_error(argv, needle, capsys)
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------------------------------------ load_finetuned
def _qat_folder(folder: Path, source: dict, weights: Callable[[Path], None]) -> Path:
    folder.mkdir()
    cfg = {"format": ft_cli.QAT_FORMAT, "version": 1, "source": source, "bits": 2, "method": "ofq", "qkr": True}
    (folder / ft_cli.QAT_CONFIG).write_text(json.dumps(cfg))
    weights(folder / ft_cli.QAT_WEIGHTS)
    return folder


LOAD_CASES = {
    "pickle-weights": ({"library": "vqsuite.zoo", "name": "fmnist-vit"}, "pickle", "cannot be read"),
    "hub-name": ({"library": "timm", "name": "hf-hub:someone/model"}, "empty", "not a vqsuite.zoo or timm model"),
    "python-library": ({"library": "os", "name": "system"}, "empty", "not a vqsuite.zoo or timm model"),
    "unknown-zoo": ({"library": "vqsuite.zoo", "name": "nope"}, "empty", "not a built-in model"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_finetuned_refuses_hostile_folders(case: str, tmp_path: Path) -> None:
    source, weights, needle = LOAD_CASES[case]
    marker = tmp_path / "pwned"
    write = {"pickle": lambda p: p.write_bytes(pickle.dumps(Evil(marker))), "empty": lambda p: None}[weights]
    folder = _qat_folder(tmp_path / "qat", source, write)
    with pytest.raises(CheckpointError, match=needle) as info:
        ft_cli.load_finetuned(folder)
    assert "\n" not in str(info.value) and "pwned" not in str(info.value)
    assert not marker.exists()


def test_readme_finetune_and_sweep_commands_parse() -> None:
    """The README's ``vqsuite finetune`` / ``vqsuite sweep`` command lines name only options that exist."""
    import shlex

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith(("vqsuite finetune", "vqsuite sweep"))]
    lines += ["vqsuite sweep config.toml --no-python-targets"]
    assert len(lines) >= 2
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert args.command in ("finetune", "sweep"), line
