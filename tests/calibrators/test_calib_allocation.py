"""Per-layer sensitivity and the milp bit allocation: budget met, exact optimum (brute force), better than a
uniform or sensitivity-blind allocation, and a config quantize_model accepts."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vqsuite import quantize_model
from vqsuite.calibrators.allocation import (
    allocate_bits,
    average_bits,
    candidate_specs,
    solve_allocation,
    spec_bits,
)
from vqsuite.calibrators.sensitivity import (
    MAX_SCORE_DB,
    Sensitivity,
    is_content_layer,
    layer_sensitivity,
    output_runner,
    sqnr_db,
    ssim,
    ssim_db,
)
from vqsuite.config import get_preset
from vqsuite.nn import QuantLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "diffusers"))

#: MixDQ's budget band
BUDGET_TOL = 0.02
N_LAYERS, WIDTH = 8, 64


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(seed: int = 0) -> nn.Sequential:
    """8 equal Linear layers; layer k has ``k`` outlier weights per row block, so 4-bit hurts some layers more."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for k in range(N_LAYERS):
        lin = nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(WIDTH, WIDTH) / WIDTH**0.5)
            idx = torch.randperm(WIDTH * WIDTH)[: 4 * ((k * 5) % N_LAYERS)]
            lin.weight.view(-1)[idx] *= 30.0
        layers += [lin, nn.GELU()]
    return nn.Sequential(*layers).eval()


def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, WIDTH, generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def sens() -> Sensitivity:
    model = mlp()
    return layer_sensitivity(model, candidate_specs(("w4a8", "w8a8")), output_runner(calib()))


def brute_force(sens: Sensitivity, budget: float) -> float:
    layers, cands = sorted(sens.scores), list(sens.specs)
    best = -float("inf")
    for combo in itertools.product(cands, repeat=len(layers)):
        choice = dict(zip(layers, combo, strict=True))
        if abs(average_bits(choice, sens) - budget) <= BUDGET_TOL + 1e-9:
            best = max(best, sens.total(choice))
    return best


def test_sensitivity_table(sens: Sensitivity) -> None:
    assert sorted(sens.scores, key=int) == [str(2 * k) for k in range(N_LAYERS)]
    assert sens.baseline_db == MAX_SCORE_DB  # the float rerun is identical
    for name, row in sens.scores.items():
        assert row["w8a8"] > row["w4a8"], (name, row)  # more bits, better output
        assert sens.numel[name] == WIDTH * WIDTH and sens.metric[name] == "sqnr"
    spread = [row["w8a8"] - row["w4a8"] for row in sens.scores.values()]
    assert max(spread) - min(spread) > 3.0, spread  # the layers really differ in sensitivity


@pytest.mark.parametrize("budget", [4.5, 5.0, 6.0, 7.5])
def test_milp_meets_budget_and_is_optimal(sens: Sensitivity, budget: float) -> None:
    alloc = solve_allocation(sens, budget, BUDGET_TOL)
    assert abs(alloc.avg_bits - budget) <= BUDGET_TOL, alloc.avg_bits
    assert alloc.status == "within tolerance"
    assert alloc.score == pytest.approx(brute_force(sens, budget), abs=1e-9)


def test_milp_beats_uniform_and_blind_allocations(sens: Sensitivity) -> None:
    budget = 4.5
    alloc = solve_allocation(sens, budget, BUDGET_TOL)
    layers = sorted(sens.scores, key=int)
    uniform = {n: "w4a8" for n in layers}  # the one uniform recipe within the budget
    assert average_bits(uniform, sens) <= budget
    blind = [{**uniform, n: "w8a8"} for n in layers]  # every allocation at the same budget, ignoring sensitivity
    blind_scores = sorted(sens.total(c) for c in blind)
    msg = f"milp {alloc.score:.2f} dB, uniform w4 {sens.total(uniform):.2f} dB, blind median {blind_scores[4]:.2f} dB"
    assert alloc.score > sens.total(uniform), msg
    assert alloc.score == pytest.approx(blind_scores[-1]) and alloc.score > blind_scores[len(blind_scores) // 2], msg


def test_allocate_bits_config_is_accepted_by_quantize_model() -> None:
    model = mlp()
    cfg, alloc, sens = allocate_bits(model, 6.0, ("w4a8", "w8a8"), calib(), return_details=True)
    assert abs(alloc.avg_bits - 6.0) <= BUDGET_TOL
    q = quantize_model(mlp(), cfg)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    assert sorted(layers) == sorted(alloc.choice)
    for name, layer in layers.items():
        assert layer.spec == get_preset(alloc.choice[name]).default
    total = sum(m.weight.numel() for m in layers.values())
    avg = sum(spec_bits(m.spec) * m.weight.numel() for m in layers.values()) / total
    assert abs(avg - 6.0) <= BUDGET_TOL


def test_keep_fp16_acts_option() -> None:
    model = mlp()
    cfg, alloc, _ = allocate_bits(model, 4.5, ("w4a8", "w8a8"), calib(), keep_fp16_acts=0.25, return_details=True)
    q = quantize_model(mlp(), cfg)
    a16 = [n for n, m in q.named_modules() if isinstance(m, QuantLayer) and m.spec.act is None]
    assert len(a16) == 2
    assert all(q.get_submodule(n).spec.weight == get_preset(alloc.choice[n]).default.weight for n in a16)


def test_infeasible_band_falls_back_to_at_most_budget(sens: Sensitivity) -> None:
    alloc = solve_allocation(sens, 4.3, BUDGET_TOL)  # 8 equal layers: averages are 4, 4.5, 5, ...
    assert alloc.status == "at most budget" and alloc.avg_bits == 4.0
    with pytest.raises(ValueError, match="below the smallest"):
        solve_allocation(sens, 3.0)


def test_metrics() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 16, 16, generator=g)
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim_db(img, img) == MAX_SCORE_DB and sqnr_db(img, img) == MAX_SCORE_DB
    noisy = img + 0.1 * torch.randn(img.shape, generator=g)
    noisier = img + 0.3 * torch.randn(img.shape, generator=g)
    assert ssim(img, noisier) < ssim(img, noisy) < 1.0
    assert sqnr_db(img, noisy) == pytest.approx(
        10 * torch.log10(img.double().pow(2).sum() / (img - noisy).double().pow(2).sum()).item()
    )
    assert ssim(img.permute(0, 2, 3, 1), noisy.permute(0, 2, 3, 1)) == pytest.approx(ssim(img, noisy))
    assert is_content_layer("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    assert is_content_layer("transformer_blocks.0.ff.net.2")
    assert not is_content_layer("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")


def test_allocate_bits_on_a_tiny_pipeline() -> None:
    """MixDQ-style on images: SSIM for cross-attention layers, SQNR for the rest; quantize_pipeline takes it."""
    import tiny_pipelines as tp

    from vqsuite.pipelines.diffusers import quantize_pipeline

    pipe = tp.sd15(64)
    names = [n for n, _ in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_out.0", "attn1.to_q"))]
    names += ["down_blocks.0.resnets.0.conv1"]
    kw = dict(height=32, width=32)
    cfg, alloc, sens = allocate_bits(
        pipe, 6.0, ("w4a8", "w8a8"), layers=names, num_inference_steps=2, pipe_kwargs=kw, return_details=True
    )
    assert sorted(sens.scores) == sorted(names)
    assert all(sens.metric[n] == ("ssim" if "attn2" in n else "sqnr") for n in names)
    assert abs(alloc.avg_bits - 6.0) <= 1.0  # few, unequal layers: the band may be infeasible
    quantize_pipeline(pipe, cfg, num_calib_prompts=1, num_inference_steps=2, height=32, width=32)
    for n in names:
        assert pipe.unet.get_submodule(n).spec == get_preset(alloc.choice[n]).default
