"""Sweeps, safe by construction: ``python:`` targets refusable (``--no-python-targets`` / ``allow_python=False``),
a corrupt or hostile cache file recomputed (never reused, never unpickled), corrupt ``results.jsonl`` lines skipped
and their cells recomputed, and the module docstring's TOML example parsing as it says."""

from __future__ import annotations

import json
import logging
import pickle
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from evals_helpers import TinyExtractor, TinyGen, gen_sample, tiny_classifier
from pickle_bait import Evil

from vqsuite.cli.main import EXIT_USAGE, main
from vqsuite.evals import sweep as sw
from vqsuite.evals.sweep import ConfigSpec, GeneratorTarget, ModelSpec, SweepError, SweepSpec, run_sweep

#: row fields that differ between two runs of the same cell (timings, memory, dates)
VOLATILE = ("wall_s", "time", "memory", "versions")


# ------------------------------------------------------------------------------------------------ python: targets
PY_CASES = {
    "source": ('source = "python:evals_helpers:tiny_classifier"\ndata = {random = 4, size = 8}', "source"),
    "data": ('source = "builtin:tiny"\ndata = "python:evals_helpers:random_data"', "data"),
    "reference": ('source = "builtin:tiny"\ndata = {random = 4, size = 8}\nreference = "python:m:f"', "reference"),
}


def _toml(model_lines: str) -> str:
    head = 'name = "py"\nmetrics = ["agreement"]\nconfigs = ["w8a8"]\n\n[[models]]\nname = "m\\u001b[31m"\n'
    return head + model_lines + "\n"


@pytest.mark.parametrize("case", list(PY_CASES))
def test_no_python_targets_refuses_each_field(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lines, field = PY_CASES[case]
    toml = tmp_path / "s.toml"
    toml.write_text(_toml(lines))
    out = tmp_path / "out"
    assert main(["sweep", str(toml), "--out", str(out), "--no-python-targets", "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vqsuite sweep: error: models[0]"), err
    assert f"{field} is a python: target" in err and "\x1b" not in err
    assert not out.exists()
    with pytest.raises(SweepError, match=f"models\\[0\\] .* {field} is a python: target"):
        sw.load_sweep(toml, allow_python=False)
    d = tomllib.loads(toml.read_text())
    with pytest.raises(SweepError, match=field):
        sw.spec_from_dict(d, allow_python=False)
    spec = sw.spec_from_dict(d)  # allowed by default (the library keeps them)
    with pytest.raises(SweepError, match=field):
        run_sweep(spec, out, progress=False, allow_python=False)
    assert not out.exists()


def test_python_targets_still_run_by_default_and_help_says_they_run_code(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text(_toml(PY_CASES["source"][0]))
    assert main(["sweep", str(toml), "--out", str(tmp_path / "out"), "--quiet", "--no-report"]) == 0
    assert main(["sweep", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--no-python-targets" in help_text and "runs the code it names" in help_text
    assert "python: targets run code" in sw.__doc__
    # a callable source is the caller's own Python, not a declaration's: not refused
    spec = SweepSpec([ModelSpec("t", tiny_classifier, data={"random": 2, "size": 8}, key="t")], [ConfigSpec("w8a8")])
    sw.check_python_targets(spec)


# ------------------------------------------------------------------------------------------------ cache files
def _gen_spec() -> SweepSpec:
    return SweepSpec(
        models=[ModelSpec("gen", lambda: GeneratorTarget(TinyGen().eval(), gen_sample), key="gen", num_samples=6)],
        configs=[ConfigSpec("w4a4")],
        metrics=["fidelity", "fid-vs-fp"],
        extractor=TinyExtractor(),
        batch_size=3,
        name="gen",
    )


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict[str, bytes]]:
    """A clean run's rows and its cache files (name -> bytes)."""
    out = tmp_path_factory.mktemp("clean")
    rows = run_sweep(_gen_spec(), out, progress=False, stop_on_error=True)
    cache = {p.name: p.read_bytes() for p in (out / "cache" / "gen").iterdir()}
    return rows, cache


def _truncate(p: Path, marker: Path) -> None:
    p.write_bytes(p.read_bytes()[:-50])


def _flip(p: Path, marker: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # still a loadable safetensors file: only the recorded sha256 tells
    p.write_bytes(bytes(data))


def _hostile(p: Path, marker: Path) -> None:
    p.write_bytes(pickle.dumps(Evil(marker)))


def _torch_save(p: Path, marker: Path) -> None:
    torch.save({"images": Evil(marker)}, p)


def _bad_sidecar(p: Path, marker: Path) -> None:
    p.with_name(p.name + sw.DIGEST_SUFFIX).write_text("{not json")


CORRUPT: dict[str, Callable[[Path, Path], None]] = {
    "truncated": _truncate,
    "flipped-bit": _flip,
    "pickle": _hostile,
    "torch-save": _torch_save,
    "bad-sidecar": _bad_sidecar,
}


@pytest.mark.parametrize("which", ["samples", "fid-stats"])
@pytest.mark.parametrize("how", list(CORRUPT))
def test_corrupt_cache_is_recomputed_not_reused(
    how: str, which: str, clean, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clean_rows, clean_cache = clean
    out, marker = tmp_path / "out", tmp_path / "pwned"
    cache = out / "cache" / "gen"
    cache.mkdir(parents=True)
    for name, data in clean_cache.items():  # the cache a first run left (same bytes as the clean run's)
        (cache / name).write_bytes(data)
    prefix = "samples_fp_main" if which == "samples" else "gen-fp-main"
    (target,) = [p for p in cache.iterdir() if p.name.startswith(prefix) and p.name.endswith(".safetensors")]
    CORRUPT[how](target, marker)
    with caplog.at_level(logging.WARNING, logger="vqsuite.evals.sweep"):
        rows = run_sweep(_gen_spec(), out, progress=False, stop_on_error=True)
    assert _stable(rows) == _stable(clean_rows)
    assert not marker.exists()
    assert f"sweep cache {target} is corrupt" in caplog.text
    # rewritten with the clean run's tensors and a fresh sidecar (the header's metadata order may differ)
    from safetensors.torch import load, load_file

    assert sw._cache_intact(target)
    fresh, ref = load_file(str(target)), load(clean_cache[target.name])
    assert fresh.keys() == ref.keys() and all(torch.equal(fresh[k], ref[k]) for k in ref)


def test_intact_cache_is_reused(clean, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_rows, clean_cache = clean
    cache = tmp_path / "cache" / "gen"
    cache.mkdir(parents=True)
    for name, data in clean_cache.items():
        (cache / name).write_bytes(data)
    from vqsuite.nn import QuantLayer

    sampled = []
    real = sw._sample

    def spy(tgt, m, seeds, *a):
        sampled.append(any(isinstance(x, QuantLayer) for x in tgt.obj.model.modules()))
        return real(tgt, m, seeds, *a)

    monkeypatch.setattr(sw, "_sample", spy)
    rows = run_sweep(_gen_spec(), tmp_path, progress=False, stop_on_error=True)
    assert _stable(rows) == _stable(clean_rows)
    # FP samples and FP statistics come from the cache: only the quantized model is sampled
    assert sampled and all(sampled)


# ------------------------------------------------------------------------------------------------ results.jsonl
BAD_LINES = {
    "binary": b"\x00\x00\x1b[31m\xff\xfe",
    "json-list": b"[1, 2, 3]",
    "json-string": b'"ok"',
    "no-hash": b'{"status": "ok", "model": "tiny"}',
    "cut-in-half": None,  # the row's own line, cut in the middle
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_corrupt_results_line_is_skipped_and_its_cell_recomputed(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = SweepSpec(
        [ModelSpec("tiny", tiny_classifier, data={"random": 4, "size": 8}, key="tiny")],
        [ConfigSpec("w8a8"), ConfigSpec("w4a16")],
        metrics=["agreement"],
        name="toy",
    )
    first = run_sweep(spec, tmp_path, progress=False, stop_on_error=True)
    results = tmp_path / sw.RESULTS_FILE
    lines = results.read_bytes().splitlines()
    assert len(lines) == 3
    bad = BAD_LINES[case]
    lines[1] = lines[1][: len(lines[1]) // 2] if bad is None else bad  # the w8a8 row, in the middle of the file
    results.write_bytes(b"\n".join(lines) + b"\n")
    calls = []
    real = sw.run_cell
    monkeypatch.setattr(sw, "run_cell", lambda s, m, c, *a, **k: calls.append(c.name) or real(s, m, c, *a, **k))
    with caplog.at_level(logging.WARNING, logger="vqsuite.evals.sweep"):
        again = run_sweep(spec, tmp_path, progress=False, stop_on_error=True)
    assert calls == ["w8a8"]
    assert "line 2 is incomplete or corrupt" in caplog.text and "\x1b" not in caplog.text
    assert sorted(r["config_name"] for r in again) == ["fp", "w4a16", "w8a8"]
    assert _stable(sorted(again, key=lambda r: r["hash"])) == _stable(sorted(first, key=lambda r: r["hash"]))


# ------------------------------------------------------------------------------------------------ documented TOML
def _doc_toml() -> str:
    """The TOML block of the sweep module docstring (the indented literal block after ``TOML ...::``)."""
    doc = sw.__doc__
    m = re.search(r"^TOML\b.*?::\n\n((?:    [^\n]*\n|\n)+)", doc, re.MULTILINE | re.DOTALL)
    assert m, "no TOML block in the vqsuite.evals.sweep docstring"
    return "\n".join(line[4:] for line in m.group(1).splitlines())


def test_docstring_toml_parses_as_documented(tmp_path: Path) -> None:
    d = tomllib.loads(_doc_toml())
    # configs is a top-level key (not the last model's), and every model table has only model keys
    assert [c if isinstance(c, str) else c["name"] for c in d["configs"]] == ["w8a8", "w4a16", "w4-custom"]
    assert [m["name"] for m in d["models"]] == ["mobilenet", "tiny-sd"]
    assert all("configs" not in m for m in d["models"])
    spec = sw.spec_from_dict(d, base_dir=tmp_path)  # validation only: the sources are not built
    assert spec.name == "classifiers" and spec.include_fp and spec.batch_size == 32
    assert [c.name for c in spec.configs] == ["w8a8", "w4a16", "w4-custom"]
    cfg = spec.configs[2].resolved()
    assert cfg.default.weight == "int4" and cfg.default.weight_group_size == 32
    assert all(c.resolved() is not None for c in spec.configs)
    assert spec.models[0].weights == str(tmp_path / "mobilenet_v2.pth") and spec.models[1].steps == 20
    assert [len(ms) for _, _, ms in spec.cells()] == [2] * 4 + [2] * 4
    with pytest.raises(SweepError, match="python: target"):  # the commented python: alternative, made real
        sw.spec_from_dict({**d, "models": [{**d["models"][0], "source": "python:pkg.module:factory"}]},
                          allow_python=False)  # fmt: skip


def test_docstring_toml_runs_through_the_cli_parser(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``vqsuite sweep`` on the documented file gets past parsing and config checks (it fails only where a source
    is built: the documented weights and folders do not exist here)."""
    toml = tmp_path / "doc.toml"
    toml.write_text(_doc_toml())
    from vqsuite.cli import sweep as cli_sweep

    spec = sw.spec_from_dict(cli_sweep.load_toml(toml), base_dir=tmp_path)
    cli_sweep.check_configs(spec)
    assert len(spec.cells()) == 8
    assert json.dumps([c.identity() for c in spec.configs])  # JSON-able identities (part of the cell hash)
