"""A real CLIP score from the shipped ``mini-clip``: by default, offline, and it separates matched from shuffled
captions on real digits; ``vqsuite eval --metrics clip`` uses it; a missing ``--clip`` folder is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vqsuite import zoo
from vqsuite.evals.clip import clip_score, default_clip_dir, load_clip

needs_mini_clip = pytest.mark.skipif(
    "mini-clip" not in zoo.list(), reason="mini-clip weights (vqsuite/zoo/weights/mini-clip) not present"
)
N_DIGITS = 200
#: CLIP-score points (100 x cosine) by which matched captions must beat a random permutation of the same captions;
#: measured on these 200 digits: 81.3 matched vs 30.0 shuffled
MATCHED_MARGIN = 20.0


def _digits() -> tuple[torch.Tensor, list[str], list[str]]:
    """The first N_DIGITS MNIST test digits padded to 32x32 (mini-sd's framing), their prompts, shuffled prompts."""
    from vqsuite.zoo.datasets import mnist_test
    from vqsuite.zoo.mini_sd import prompt

    x, y = mnist_test()
    x = torch.nn.functional.pad(x[:N_DIGITS], (2, 2, 2, 2))
    prompts = [prompt(int(d)) for d in y[:N_DIGITS]]
    perm = torch.randperm(N_DIGITS, generator=torch.Generator().manual_seed(0)).tolist()
    return x, prompts, [prompts[i] for i in perm]


@needs_mini_clip
def test_default_source_is_the_shipped_mini_clip() -> None:
    model, processor = load_clip()
    assert default_clip_dir() == zoo.mini_clip.WEIGHTS_DIR
    assert model.config.vision_config.image_size == 32 and processor.tokenizer is not None


@needs_mini_clip
def test_clip_score_matched_beats_shuffled_on_real_digits() -> None:
    images, prompts, shuffled = _digits()
    pair = load_clip()
    matched = clip_score(images, prompts, pair, progress=False)  # 1-channel uint8, repeated to RGB
    wrong = clip_score(images, shuffled, pair, progress=False)
    assert matched > wrong + MATCHED_MARGIN, (matched, wrong)
    # the default source (None) is the same model: the same number
    assert clip_score(images[:20], prompts[:20], progress=False) == pytest.approx(
        clip_score(images[:20], prompts[:20], pair, progress=False), abs=1e-4
    )


@needs_mini_clip
@pytest.mark.slow
def test_cli_eval_metrics_clip_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``vqsuite eval mini-sd --metrics clip`` scores FP and w8a8 samples with mini-clip, hub switched off."""
    from vqsuite.cli.main import main

    if "mini-sd" not in zoo.list():
        pytest.skip("mini-sd weights not present")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "eval"
    argv = ["--quiet", "eval", "mini-sd", "--preset", "w8a8", "--metrics", "clip", "--num-samples", "2"]
    assert main([*argv, "--steps", "2", "--out", str(out), "--no-report"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 2
    for r in rows:
        assert r.get("status", "ok") == "ok", r
        score = r["metrics"]["clip_score"] if "metrics" in r else r["clip_score"]
        assert 0.0 <= score <= 100.0


def test_cli_eval_missing_clip_folder_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vqsuite.cli.main import main

    missing = tmp_path / "no-such-clip"
    argv = ["eval", "mini-sd", "--preset", "w8a8", "--metrics", "clip", "--clip", str(missing)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a CLIP model folder" in err and str(missing) in err
