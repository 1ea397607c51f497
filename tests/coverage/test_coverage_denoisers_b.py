"""Architecture coverage, diffusers denoisers K–Z: every class, built small, quantized with every preset.

Each case (``denoiser_cases_b.CASES``) is run by :func:`coverage_run.run_case` through the class's architecture
rule, as ``quantize_pipeline`` does: it must not raise, its output must stay finite, and it must quantize something.
Cases that fail only because of a fix that lives on another branch are marked ``xfail`` through
:data:`KNOWN_FAILURES`; remove an entry once that fix is merged (``strict=False``, so a fixed case just shows XPASS).
"""

from __future__ import annotations

import pytest
from coverage_run import run_case
from denoiser_cases import all_denoiser_classes
from denoiser_cases_b import CASES, NO_CASE

#: the presets every case runs with: weight-only int8/int4, W8A8, W4A4, NVFP4 and SVDQuant
PRESETS: tuple[str, ...] = ("w8a16", "w4a16", "w8a8", "w4a4", "nvfp4", "svdquant-int4")

#: presets that calibrate by search (SVDQuant: even trimmed to coverage_run.FAST_SVDQUANT_OPTIONS, seconds per
#: case on a shared CPU), so they run in the slow tier on :data:`SVDQUANT_CASES` only (benchmarks/coverage.py runs
#: all). The run checks SVDQuant's path (calibrate, pack, low-rank forward), not its error
SLOW_PRESETS: frozenset[str] = frozenset({"svdquant-int4"})
#: the K–Z cases SVDQuant calibrates in the suite: the families its recipe is written for
SVDQUANT_CASES: frozenset[str] = frozenset(
    {
        "SanaTransformer2DModel",
        "SD3Transformer2DModel",
        "UNet2DConditionModel",
        "QwenImageTransformer2DModel",
        "PixArtTransformer2DModel",
        "WanTransformer3DModel",
        "UNetMotionModel",  # calls proj_in(input=...): the keyword call must be calibrated too
    }
)

#: (class, preset or "*") -> why it fails today; delete an entry once its fix is merged
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

#: cases whose first forward compiles PyTorch's flex-attention block mask (tens of seconds once per process)
FLEX_ATTENTION_CASES: frozenset[str] = frozenset({"WanAnimate2Transformer3DModel", "Kandinsky6SRTransformer3DModel"})


def _in_this_half(name: str) -> bool:
    """Class names K–Z are this file's half (denoiser_cases_a has A–J)."""
    return name[:1].upper() >= "K"


def _param(name: str, preset: str) -> pytest.param:
    marks = []
    reason = KNOWN_FAILURES.get((name, preset)) or KNOWN_FAILURES.get((name, "*"))
    if reason:
        marks.append(pytest.mark.xfail(reason=reason, strict=False))
    if name in FLEX_ATTENTION_CASES or preset in SLOW_PRESETS:
        marks.append(pytest.mark.slow)
    return pytest.param(name, preset, marks=marks, id=f"{name}-{preset}")


def test_every_class_of_this_half_has_a_case_or_a_reason() -> None:
    classes = [n for n in all_denoiser_classes() if _in_this_half(n)]
    missing = [n for n in classes if n not in CASES and n not in NO_CASE]
    assert not missing, f"no case and no NO_CASE reason for {missing}"
    assert not set(CASES) & set(NO_CASE), f"both a case and a NO_CASE reason: {set(CASES) & set(NO_CASE)}"
    unknown = sorted((set(CASES) | set(NO_CASE)) - set(classes))
    assert not unknown, f"not a K–Z denoiser class of the installed diffusers: {unknown}"
    assert all(reason.strip() for reason in NO_CASE.values())


@pytest.mark.parametrize(
    ("name", "preset"),
    [_param(n, p) for n in sorted(CASES) for p in PRESETS if p not in SLOW_PRESETS or n in SVDQUANT_CASES],
)
def test_denoiser_quantizes(name: str, preset: str) -> None:
    result = run_case(name, CASES[name], preset, denoiser=True)
    assert result.status != "error", f"{name} {preset}: {result.error}"
    assert result.status != "nonfinite", f"{name} {preset}: non-finite output (SQNR {result.sqnr_db:.1f} dB)"
    assert result.status == "ok", f"{name} {preset}: quantized nothing (skipped {result.skipped})"
    assert result.fraction > 0
