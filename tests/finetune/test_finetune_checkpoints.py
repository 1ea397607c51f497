"""Fine-tuning checkpoints are safe by construction: no pickle is ever loaded (a hostile file's code never runs), a
pointer never leaves its folder, a corrupt file is one readable line that quotes none of its bytes, and a save
removes only the folders it wrote."""

from __future__ import annotations

import importlib
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pickle_bait import Evil
from torch import nn

from vqsuite.errors import UserError
from vqsuite.finetune import checkpoint as ck
from vqsuite.pipelines.io import CheckpointError

#: the module (``vqsuite.finetune.qalora`` the attribute is the function)
ql = importlib.import_module("vqsuite.finetune.qalora")


def _hostile_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Evil(marker)))


def _hostile_torch_save(path: Path, marker: Path) -> None:
    torch.save({"state": Evil(marker)}, path)


HOSTILE = {"pickle": _hostile_pickle, "torch-save": _hostile_torch_save}


def _assert_one_line(err: BaseException, *needles: str, forbidden: tuple[str, ...] = ()) -> None:
    msg = str(err)
    assert isinstance(err, UserError) and "\n" not in msg and "\x1b" not in msg, msg
    for n in needles:
        assert n in msg, msg
    for f in forbidden:
        assert f not in msg, msg


# ------------------------------------------------------------------------------------------------ pack / unpack
def test_pack_round_trips_optimizer_like_state() -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 1: {"step": torch.tensor(1.0)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None, "eps": float("inf")}],
        "history": [{"loss": 0.5}],
    }
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(ck.pack(state, "optim", tensors)))
    back = ck.unpack(tree, tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and list(back["state"]) == [0, 1]
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["param_groups"][0]["eps"] == float("inf") and back["history"] == state["history"]
    with pytest.raises(CheckpointError, match="does not hold"):
        ck.unpack({"__tensor__": "nope"}, tensors)
    with pytest.raises(TypeError, match="cannot store a Evil"):
        ck.pack({"x": Evil(Path("unused"))}, "p", {})


# ------------------------------------------------------------------------------------------------ OFQ
def _tiny_vit():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)


OFQ_KW = dict(bits=2, steps=2, cga_steps=1, batch_size=8, log_every=0)


def _ofq_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 1, 8, 8, generator=g), torch.randint(3, (32,), generator=g)


@pytest.fixture(scope="module")
def ofq_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vqsuite.finetune import ofq

    path = tmp_path_factory.mktemp("ofq") / "ofq.safetensors"
    ofq(_tiny_vit(), train_data=_ofq_data(), checkpoint_path=path, stop_after=1, **OFQ_KW)
    return path


def test_ofq_checkpoint_is_safetensors_with_json_state(ofq_checkpoint: Path) -> None:
    from safetensors import safe_open

    from vqsuite.finetune.ofq import read_ofq_checkpoint_meta

    assert not ck.is_pickle(ofq_checkpoint)
    with safe_open(str(ofq_checkpoint), framework="pt") as f:
        keys = set(f.keys())
    assert "generator" in keys
    assert any(k.startswith("model/") for k in keys) and any(k.startswith("optim/") for k in keys)
    meta = read_ofq_checkpoint_meta(ofq_checkpoint)
    assert meta["step"] == 1 and len(meta["history"]) == 1 and meta["options"]["bits"] == 2
    assert not [p for p in ofq_checkpoint.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def _truncate(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size - 100])


def _flip_last_byte(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    data[-1] ^= 0xFF
    dst.write_bytes(bytes(data))


def _bad_json_state(src: Path, dst: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(dst), metadata={"format": "vqsuite-ofq-checkpoint", "version": "1",
                                                        "state": "{\x1b[31m not json", "sha256": ""})  # fmt: skip


def _random_bytes(src: Path, dst: Path) -> None:
    dst.write_bytes(b"\x1b[31m" + os.urandom(300))


def _header_only(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes()[:6])


OFQ_CORRUPT: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "truncated": (_truncate, "cannot be read"),
    "flipped-byte": (_flip_last_byte, "checksum"),
    "bad-json-state": (_bad_json_state, "JSON state is corrupt"),
    "random-bytes": (_random_bytes, "not a safetensors file"),
    "header-only": (_header_only, "truncated"),
}


@pytest.mark.parametrize("how", list(HOSTILE) + list(OFQ_CORRUPT))
def test_ofq_resume_refuses_hostile_and_corrupt_checkpoints(how: str, ofq_checkpoint: Path, tmp_path: Path) -> None:
    from vqsuite.finetune import ofq

    marker, path = tmp_path / "pwned", tmp_path / "ofq.safetensors"
    if how in HOSTILE:
        HOSTILE[how](path, marker)
        needle = "old pickle format"
    else:
        make, needle = OFQ_CORRUPT[how]
        make(ofq_checkpoint, path)
    with pytest.raises(CheckpointError) as info:
        ofq(_tiny_vit(), train_data=_ofq_data(), checkpoint_path=path, resume=True, **OFQ_KW)
    _assert_one_line(info.value, needle, str(path), forbidden=("pwned",))
    assert not marker.exists()


def test_ofq_resume_refuses_other_options(ofq_checkpoint: Path) -> None:
    from vqsuite.finetune import ofq

    with pytest.raises(CheckpointError) as info:
        ofq(_tiny_vit(), train_data=_ofq_data(), checkpoint_path=ofq_checkpoint, resume=True, **{**OFQ_KW, "steps": 3})
    _assert_one_line(info.value, "other options", "steps 2 -> 3")


# ------------------------------------------------------------------------------------------------ QALoRA
def _qalora_checkpoint(folder: Path, u: int = 1) -> None:
    """A real QALoRA checkpoint of two trainables (one AdamW step), written by ``_save_checkpoint``."""
    torch.manual_seed(0)
    trainable = {"a": nn.Parameter(torch.randn(3, 2)), "b": nn.Parameter(torch.randn(4))}
    optim = torch.optim.AdamW(list(trainable.values()), lr=1e-3)
    (trainable["a"].sum() + trainable["b"].sum()).backward()
    optim.step()
    state = {"signature": {"steps": 4}, "updates": u, "loss_curve": [0.5] * u, "wall_s": 1.0}
    ql._save_checkpoint(folder, u, trainable, optim, state, torch.zeros(1, 4))


def _pointer(target: str | list) -> Callable[[Path, Path], None]:
    def make(folder: Path, outside: Path) -> None:
        (folder / ql.CKPT_LATEST).write_text(json.dumps({"dir": target, "updates": 1}))

    return make


def _symlinked(folder: Path, outside: Path) -> None:
    # a step folder that is a symlink to a (complete, ours-looking) checkpoint outside the folder
    _qalora_checkpoint(outside)
    os.symlink(outside / "step-000001", folder / "step-000009")
    (folder / ql.CKPT_LATEST).write_text(json.dumps({"dir": "step-000009", "updates": 1}))


def _file_symlink_out(folder: Path, outside: Path) -> None:
    outside.mkdir(exist_ok=True)
    (outside / "state.json").write_text('{"secret": 1}')
    d = folder / "step-000001"
    (d / ql.CKPT_STATE).unlink()
    os.symlink(outside / "state.json", d / ql.CKPT_STATE)


def _replace(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    def make(folder: Path, outside: Path) -> None:
        f = folder / "step-000001" / name
        f.write_bytes(data(f.read_bytes()) if callable(data) else data)

    return make


def _remove(name: str) -> Callable[[Path, Path], None]:
    def make(folder: Path, outside: Path) -> None:
        (folder / "step-000001" / name).unlink()

    return make


def _hostile_optimizer(kind: str) -> Callable[[Path, Path], None]:
    def make(folder: Path, outside: Path) -> None:
        HOSTILE[kind](folder / "step-000001" / ql.CKPT_OPTIM, folder.parent / "pwned")

    return make


ESC = "\x1b[31mred\x1b[0m"
QALORA_BAD: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "dotdot": (_pointer(".."), "does not name a checkpoint folder"),
    "parent-step": (_pointer("../step-000001"), "does not name a checkpoint folder"),
    "absolute": (_pointer("/tmp/step-000001"), "does not name a checkpoint folder"),
    "separator": (_pointer("step-000001/x"), "does not name a checkpoint folder"),
    "not-a-string": (_pointer(["step-000001"]), "does not name a checkpoint folder"),
    "ansi": (_pointer(ESC), "does not name a checkpoint folder"),
    "absent-folder": (_pointer("step-000002"), "does not exist"),
    "symlink-dir-outside": (_symlinked, "points outside"),
    "symlink-file-outside": (_file_symlink_out, "points outside"),
    "latest-bad-json": (lambda f, o: (f / ql.CKPT_LATEST).write_bytes(b"{" + ESC.encode()), "cannot be read"),
    "latest-not-object": (lambda f, o: (f / ql.CKPT_LATEST).write_text("[1]"), "not a JSON object"),
    "state-bad-json": (_replace(ql.CKPT_STATE, ESC.encode()), "cannot be read"),
    "trainable-truncated": (_replace(ql.CKPT_TRAINABLE, lambda b: b[:-5]), "truncated or corrupt"),
    "tensors-garbage": (_replace(ql.CKPT_TENSORS, ESC.encode() * 10), "truncated or corrupt"),
    "optimizer-corrupt": (_replace(ql.CKPT_OPTIM, lambda b: b[: len(b) // 2]), "cannot be read"),
    "optimizer-garbage": (_replace(ql.CKPT_OPTIM, ESC.encode() * 10), "cannot be read"),
    "optimizer-pickle": (_hostile_optimizer("pickle"), "refused unread"),
    "optimizer-torch-save": (_hostile_optimizer("torch-save"), "refused unread"),
    "missing-optimizer": (_remove(ql.CKPT_OPTIM), "optimizer.pt is missing"),
    "missing-state": (_remove(ql.CKPT_STATE), "state.json is missing"),
}


@pytest.mark.parametrize("case", list(QALORA_BAD))
def test_qalora_load_refuses_bad_checkpoints_in_one_line(case: str, tmp_path: Path) -> None:
    folder, outside = tmp_path / "ck", tmp_path / "outside"
    _qalora_checkpoint(folder)
    make, needle = QALORA_BAD[case]
    make(folder, outside)
    with pytest.raises(CheckpointError) as info:
        ql._load_checkpoint(folder)
    _assert_one_line(info.value, needle, forbidden=("red", "secret", "pwned"))
    assert not (tmp_path / "pwned").exists()


def test_qalora_valid_checkpoint_loads(tmp_path: Path) -> None:
    _qalora_checkpoint(tmp_path)
    state, trainable, optim, extra = ql._load_checkpoint(tmp_path)
    assert state["format"] == ql.CKPT_FORMAT and state["updates"] == 1 and set(trainable) == {"a", "b"}
    assert set(optim) == {"state", "param_groups"} and extra["latents"].shape == (1, 4)
    assert ql.verify_checkpoint(tmp_path)["updates"] == 1 and ql.verify_checkpoint(tmp_path / "none") is None


def test_qalora_save_removes_only_the_folders_it_wrote(tmp_path: Path) -> None:
    folder, outside = tmp_path / "ck", tmp_path / "outside"
    folder.mkdir()
    users = folder / "step-000099"  # a user's folder that happens to match the pattern
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    foreign_state = folder / "step-000050"  # a state.json that is not ours
    foreign_state.mkdir()
    (foreign_state / ql.CKPT_STATE).write_text('{"hello": 1}')
    outside.mkdir()
    (outside / ql.CKPT_STATE).write_text(json.dumps({"format": ql.CKPT_FORMAT}))
    os.symlink(outside, folder / "step-000007")  # a symlinked look-alike of ours: never followed for removal
    (folder / "step-other").mkdir()
    _qalora_checkpoint(folder, 1)
    assert (folder / "step-000001").is_dir()
    _qalora_checkpoint(folder, 2)  # removes step-000001 (ours, named by the previous pointer) and nothing else
    assert not (folder / "step-000001").exists() and (folder / "step-000002" / ql.CKPT_OPTIM).is_file()
    assert (users / "notes.txt").read_text() == "mine" and (foreign_state / ql.CKPT_STATE).is_file()
    assert (outside / ql.CKPT_STATE).is_file() and (folder / "step-000007").is_symlink()
    assert (folder / "step-other").is_dir()
    assert json.loads((folder / ql.CKPT_LATEST).read_text())["dir"] == "step-000002"
    # a pointer edited to name a user's folder: that folder is not removed at the next save
    (folder / ql.CKPT_LATEST).write_text(json.dumps({"dir": "step-000099", "updates": 2}))
    _qalora_checkpoint(folder, 3)
    assert (users / "notes.txt").is_file() and (folder / "step-000002").is_dir()
    # a save onto a user's folder of the same name is refused, before and while training
    with pytest.raises(CheckpointError, match="not written by qalora"):
        _qalora_checkpoint(folder, 99)
    with pytest.raises(CheckpointError, match="not written by qalora"):
        ql._check_planned(folder, 0, 99, 33)
    ql._check_planned(folder, 0, 98, 11)  # none of steps 7, 50, 99 is written by this run
    assert (users / "notes.txt").read_text() == "mine"
