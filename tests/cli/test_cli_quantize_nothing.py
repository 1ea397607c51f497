"""``vqsuite quantize`` that quantizes no layer says why (the first skipped layer and its reason), exit 2, and
writes nothing."""

from __future__ import annotations

from pathlib import Path

from vqsuite.cli.main import main


def test_quantize_with_every_layer_excluded_says_why(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    rc = main(["quantize", "mnist-cnn3", "--preset", "w8a16", "--exclude", "*", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "nothing was quantized" in err and "excluded by pattern" in err
    assert not out.exists()
