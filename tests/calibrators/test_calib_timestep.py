"""Timestep-aware calibration: the step hook on tiny pipelines, per-step / bucketed static scales, step sampling,
nearest-slot fallback and checkpoint round trips."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vqsuite import load_quantized, quantize_model, save_quantized
from vqsuite.calibrators.timestep import (
    all_steps,
    attach_step_tracker,
    calibrate_static_scales,
    normal_steps,
    step_tracker_of,
    uniform_steps,
)
from vqsuite.config import QuantSpec
from vqsuite.nn import QLinear, QuantLayer
from vqsuite.nn import steps as steps_mod
from vqsuite.nn.steps import StepInfo, bucket_of, publish, slot_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "diffusers"))

#: per-step scales must cut the W8A8 output error (relative MSE per step, averaged) at least this much
#: (measured: about 180x; pooled scales leave the late, small-range steps a few levels)
MIN_ERROR_RATIO = 20.0
#: the activation range of the test denoiser grows from 1x (t = 0) to this at t = 1000
RANGE_GROWTH = 50.0
CAL_STEPS = 10
#: max|x| of different N(0, 1) batches of 2048 values differs by less than this factor
MAX_SCALE_SPREAD = 1.5
WIDTH = 64


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class GrowingDenoiser(nn.Module):
    """eps(x, t): a two-layer MLP whose input (and so every activation) is scaled by ``1 + 49 t / 1000``."""

    def __init__(self, width: int = WIDTH, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1)[:1]
        s = 1 + (RANGE_GROWTH - 1) * t / 1000
        return self.fc2(torch.relu(self.fc1(x * s)))


def timesteps(n: int) -> list[float]:
    return torch.linspace(999, 0, n).tolist()


def inputs(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, WIDTH, generator=g) for _ in range(n)]


def run_loop(model: nn.Module, n: int, seed: int, publish_steps: bool = True) -> list[torch.Tensor]:
    """A plain sampling loop over ``n`` steps that publishes each step itself."""
    outs = []
    with torch.no_grad():
        for i, (t, x) in enumerate(zip(timesteps(n), inputs(n, seed), strict=True)):
            if publish_steps:
                with publish(StepInfo(i, t, n)):
                    outs.append(model(x, t))
            else:
                outs.append(model(x, t))
    return outs


def rel_error(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Relative MSE of the denoiser output at each step, averaged over steps (every step counts alike, as in
    sampling, however small its output)."""
    per_step = [float((a - b).pow(2).sum() / a.pow(2).sum()) for a, b in zip(ref, got, strict=True)]
    return sum(per_step) / len(per_step)


def pooled_rel_error(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Relative MSE over all steps together (dominated by the noisiest, largest outputs)."""
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(ref, got, strict=True))
    return num / sum(float(a.pow(2).sum()) for a in ref)


def static_spec(granularity: str = "pooled", **kw) -> QuantSpec:
    return QuantSpec(weight="int8", act="int8", act_mode="static", act_granularity=granularity, **kw)


def quantized(granularity: str, n_cal: int = CAL_STEPS, freeze: bool = True, **kw) -> nn.Module:
    model = GrowingDenoiser()
    spec = static_spec(granularity, **kw)
    return quantize_model(model, spec, calib_data=lambda m: run_loop(m, n_cal, seed=1), freeze=freeze)


# ------------------------------------------------------------------------------ the hook
@pytest.mark.parametrize("name", ["sd15", "pixart"], ids=["unet-sd15", "transformer-pixart"])
@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_hook_publishes_steps_in_order(name: str, guidance: float) -> None:
    import tiny_pipelines as tp

    pipe = tp.BUILDERS[name](tp.TEST_WIDTH[name])
    pipe.set_progress_bar_config(disable=True)
    tracker = attach_step_tracker(pipe)
    seen: list[StepInfo] = []
    inside: list[tuple[StepInfo, ...]] = []
    remove = steps_mod.add_listener(seen.append)
    den = pipe.unet if name == "sd15" else pipe.transformer
    probe = den.register_forward_pre_hook(lambda m, a: inside.append(steps_mod.current_steps()))
    n = 3
    try:
        kw = dict(height=32, width=32, num_inference_steps=n, output_type="latent", **tp.CALL_KWARGS.get(name, {}))
        if name == "pixart":
            kw["clean_caption"] = False
        for _ in range(2):  # a second run starts again at step 0
            seen.clear()
            pipe(["a red cat", "a dog"], guidance_scale=guidance, **kw)
            branches = ("uncond", "cond") if guidance > 1 else ("all",)
            assert [(s.index, s.branch) for s in seen] == [(i, b) for i in range(n) for b in branches]
            assert all(s.num_steps == n for s in seen)
            ts = [s.t for s in seen[:: len(branches)]]
            assert ts == sorted(ts, reverse=True) and len(set(ts)) == n, ts
            if guidance > 1:  # the batch of 2 prompts x 2 branches is split in halves, unconditional first
                assert [s.rows for s in seen[:2]] == [(0, 2), (2, 4)]
                assert all(s.batch_size == 4 for s in seen)
            else:
                assert all(s.rows == (0, 2) for s in seen)
        assert inside and all(len(c) == len(branches) for c in inside)
        assert steps_mod.current_steps() == ()  # cleared after every call
    finally:
        remove()
        probe.remove()
        tracker.remove()
    assert step_tracker_of(den) is None


def test_hook_on_flux_maps_scaled_timesteps() -> None:
    """FLUX's transformer gets t / 1000 and guidance as an embedding (no CFG batch): indices still in order."""
    import tiny_pipelines as tp

    pipe = tp.flux(tp.TEST_WIDTH["flux"])
    pipe.set_progress_bar_config(disable=True)
    tracker = attach_step_tracker(pipe)
    seen: list[StepInfo] = []
    remove = steps_mod.add_listener(seen.append)
    try:
        pipe("a cat", height=32, width=32, num_inference_steps=3, guidance_scale=3.5, output_type="latent")
    finally:
        remove()
        tracker.remove()
    assert [(s.index, s.num_steps, s.branch) for s in seen] == [(i, 3, "all") for i in range(3)]
    assert all(0 < s.t <= 1 for s in seen)


def test_tracker_counts_calls_without_scheduler() -> None:
    model = GrowingDenoiser()
    tracker = attach_step_tracker(model, num_steps=4)
    seen: list[StepInfo] = []
    remove = steps_mod.add_listener(seen.append)
    try:
        run_loop(model, 4, seed=0, publish_steps=False)
    finally:
        remove()
        tracker.remove()
    assert [(s.index, s.num_steps) for s in seen] == [(i, 4) for i in range(4)]
    assert [s.t for s in seen] == pytest.approx(timesteps(4))


# ------------------------------------------------------------------------------ per-step scales
def test_per_step_scales_differ_across_steps() -> None:
    model = quantized("per_step")
    for layer in (model.fc1, model.fc2):
        table = layer.act_scale_steps
        assert table.shape == (CAL_STEPS,) and layer.spec.n_buckets == CAL_STEPS
        assert bool(torch.isfinite(table).all())
        # step 0 is the noisiest: its range is the widest
        assert float(table[0] / table[-1]) > RANGE_GROWTH / 5, table
        assert int(table.argmax()) == 0 and int(table.argmin()) == CAL_STEPS - 1, table
        assert float(layer.act_scale) == pytest.approx(float(table.max()))  # pooled = widest
        assert layer.act_scale_t.tolist() == pytest.approx(timesteps(CAL_STEPS))
    # fc1 sees x * s(t): its scales follow s(t) up to the spread of max|x| between random batches
    s_t = torch.tensor([1 + (RANGE_GROWTH - 1) * t / 1000 for t in timesteps(CAL_STEPS)])
    ratio = model.fc1.act_scale_steps / s_t
    assert float(ratio.max() / ratio.min()) < MAX_SCALE_SPREAD, ratio


def test_per_step_scales_beat_pooled_w8a8() -> None:
    fp = GrowingDenoiser()
    ref = run_loop(fp, CAL_STEPS, seed=7)  # other inputs than calibration (seed 1)
    outs = {g: run_loop(quantized(g), CAL_STEPS, seed=7) for g in ("pooled", "per_step")}
    outs["bucketed"] = run_loop(quantized("bucketed", n_buckets=5), CAL_STEPS, seed=7)
    errs = {g: rel_error(ref, o) for g, o in outs.items()}
    sums = {g: pooled_rel_error(ref, o) for g, o in outs.items()}
    msg = "W8A8 static, relative MSE per step (averaged): " + ", ".join(f"{k} {v:.3e}" for k, v in errs.items())
    msg += "; over all steps together: " + ", ".join(f"{k} {v:.3e}" for k, v in sums.items())
    assert errs["per_step"] * MIN_ERROR_RATIO < errs["pooled"], msg
    assert errs["per_step"] <= errs["bucketed"] < errs["pooled"], msg
    assert sums["per_step"] < sums["pooled"], msg


def test_layer_uses_the_published_steps_scale_in_forward() -> None:
    model = quantized("per_step")
    layer: QLinear = model.fc1
    x = torch.randn(2, WIDTH) * 3
    for i, t in enumerate(timesteps(CAL_STEPS)):
        with publish(StepInfo(i, t, CAL_STEPS)):
            assert layer.act_scale is not None and float(layer.act_scale) == float(layer.act_scale_steps[i])
            y = layer(x)
        # the same forward with that step's scale written as the pooled one
        twin = copy.deepcopy(layer)
        twin._buffers.pop("act_scale_steps")
        twin._buffers.pop("act_scale_t")
        twin._buffers["act_scale"] = layer.act_scale_steps[i].clone()
        assert torch.equal(y, twin(x))
    assert float(layer.act_scale) == float(layer._buffers["act_scale"])  # no step: pooled


# ------------------------------------------------------------------------------ fallbacks
def test_nearest_slot_when_step_count_differs() -> None:
    model = quantized("per_step")
    layer = model.fc1
    keys = layer.act_scale_t
    for j, t in enumerate(timesteps(4)):
        nearest = int((keys - t).abs().argmin())
        with publish(StepInfo(j, t, 4)):
            assert float(layer.act_scale) == float(layer.act_scale_steps[nearest]), (j, t, nearest)
    # the same step count uses each step's own slot
    assert slot_for(StepInfo(3, math.nan, CAL_STEPS), "per_step", [True] * CAL_STEPS, [math.nan] * CAL_STEPS) == 3
    # without timesteps: nearest by relative position
    assert slot_for(StepInfo(1, math.nan, 3), "per_step", [True] * 5, [math.nan] * 5) == 2


def test_bucketed_falls_back_to_nearest_calibrated_bucket() -> None:
    model = GrowingDenoiser()
    spec = static_spec("bucketed", n_buckets=4)
    quantize_model(model, spec, calib_data=lambda m: run_loop(m, 8, seed=1), freeze=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    # recalibrate from steps {0, 4} only: buckets 1 and 3 see nothing
    calibrate_static_scales(model, layers, lambda m: run_loop(m, 8, seed=1), sampler=uniform_steps(2))
    table = model.fc1.act_scale_steps
    assert torch.isfinite(table).tolist() == [True, False, True, False]
    for i, want in [(0, 0), (2, 0), (3, 0), (4, 2), (7, 2)]:
        with publish(StepInfo(i, timesteps(8)[i], 8)):
            assert float(model.fc1.act_scale) == float(table[want]), (i, want)
    # another step count maps by position: step 5 of 6 -> bucket 3 (empty) -> bucket 2
    assert bucket_of(5, 6, 4) == 3
    with publish(StepInfo(5, 0.0, 6)):
        assert float(model.fc1.act_scale) == float(table[2])


def test_step_samplers() -> None:
    assert all_steps()(5) == frozenset(range(5))
    assert uniform_steps(5)(50) == frozenset(range(0, 50, 10))  # Q-Diffusion: range(0, n, n // cali_st)
    assert uniform_steps(8)(4) == frozenset(range(4))
    drawn = normal_steps(256, mu=0.4, sigma=0.1, seed=0)(100)
    assert drawn <= frozenset(range(100)) and max(drawn) <= 80  # mu + 4 sigma
    assert 35 < sum(drawn) / len(drawn) < 45
    assert normal_steps(16, mu=0.4, sigma=0.0)(100) == frozenset({40})  # int(mu * T)
    assert normal_steps(64, mu=0.0, sigma=1.0)(10) <= frozenset(range(10))  # clamped to [0, T-1]
    assert normal_steps(256, mu=0.4, sigma=0.1, seed=0)(100) == drawn  # seeded


def test_cfg_batch_split_per_branch_stats() -> None:
    """With both CFG branches in one batch, the statistics of each half are kept apart."""
    model = GrowingDenoiser()
    layers_spec = static_spec("per_step")
    quantize_model(model, layers_spec, calib_data=lambda m: run_loop(m, 2, seed=0), freeze=False)
    layers = {"fc1": model.fc1}

    def cfg_loop(m: nn.Module) -> None:
        for i, t in enumerate(timesteps(2)):
            x = torch.cat([torch.ones(2, 3, WIDTH), 5 * torch.ones(2, 3, WIDTH)])  # uncond rows 1, cond rows 5
            infos = (StepInfo(i, t, 2, "uncond", (0, 2), 4), StepInfo(i, t, 2, "cond", (2, 4), 4))
            with publish(infos):
                m(x, t)

    stats = calibrate_static_scales(model, layers, cfg_loop)["fc1"]
    for i, t in enumerate(timesteps(2)):
        s = 1 + (RANGE_GROWTH - 1) * t / 1000
        assert stats.branch_absmax[(("i", i), "uncond")] == pytest.approx(s, rel=1e-6)
        assert stats.branch_absmax[(("i", i), "cond")] == pytest.approx(5 * s, rel=1e-6)


# ------------------------------------------------------------------------------ persistence and specs
def test_per_step_scales_round_trip_save_load(tmp_path: Path) -> None:
    model = quantized("per_step")
    assert model.fc1.frozen
    before = run_loop(model, CAL_STEPS, seed=3)
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt", model=GrowingDenoiser(seed=5))
    assert loaded.fc1.spec == model.fc1.spec and loaded.fc1.spec.n_buckets == CAL_STEPS
    assert torch.equal(loaded.fc1.act_scale_steps, model.fc1.act_scale_steps)
    assert torch.equal(loaded.fc1.act_scale_t, model.fc1.act_scale_t)
    after = run_loop(loaded, CAL_STEPS, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_static_scales_survive_dtype_conversion() -> None:
    model = quantized("per_step").to(torch.float64)
    assert model.fc1.act_scale_steps.dtype == torch.float32


def test_spec_fields_validate_and_serialise() -> None:
    s = static_spec("bucketed", n_buckets=4, act_range="mse")
    assert QuantSpec.from_dict(s.to_dict()) == s
    assert "act_granularity" not in static_spec().to_dict()  # defaults stay out: old readers still read it
    assert "/b4" in s.short()
    with pytest.raises(ValueError, match="n_buckets"):
        static_spec("bucketed")
    with pytest.raises(ValueError, match="act_granularity"):
        QuantSpec(weight="int8", act="int8", act_mode="dynamic_per_token", act_granularity="per_step")
    with pytest.raises(ValueError, match="act_range='p99'"):
        static_spec(act_range="p99")
    with pytest.raises(ValueError, match="n_buckets=3 needs"):
        static_spec(n_buckets=3)


def test_quantize_pipeline_per_step_static_round_trip(tmp_path: Path) -> None:
    """quantize_pipeline attaches the hook, calibrates one scale per step (CFG batches split), samples with another
    step count (nearest slot) and a saved pipeline loads with its hook and gives the same images."""
    import tiny_pipelines as tp

    from vqsuite.config import QuantConfig

    cfg = QuantConfig(default=static_spec("per_step"))
    pipe = tp.quantize("sd15", "w8a8", config=cfg, num_inference_steps=3)
    tracker = step_tracker_of(pipe.unet)
    assert tracker is not None
    layers = [m for m in pipe.unet.modules() if isinstance(m, QuantLayer)]
    assert layers and all(m.has_step_scales and m.spec.n_buckets == 3 for m in layers)
    assert all(bool(torch.isfinite(m.act_scale_steps).all()) for m in layers)
    assert sum(bool((m.act_scale_steps != m.act_scale_steps[0]).any()) for m in layers) > len(layers) // 2
    images = tp.generate(pipe, "sd15", steps=3)
    other = tp.generate(pipe, "sd15", steps=5)  # nearest calibrated step for each of the 5
    assert bool(torch.isfinite(images).all()) and bool(torch.isfinite(other).all())
    save_quantized(pipe, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert step_tracker_of(loaded.unet) is not None and step_tracker_of(loaded.unet)._scheduler is not None
    assert torch.equal(tp.generate(loaded, "sd15", steps=3), images)
    step_tracker_of(loaded.unet).remove()  # without the hook the layers fall back to their pooled scales
    assert not torch.equal(tp.generate(loaded, "sd15", steps=3), images)


def test_kernels_read_the_steps_scale_through_static_act_scale() -> None:
    """Fused kernels take the per-tensor scale from kernels.reference.static_act_scale: a plain 0-d tensor, the
    published step's slot (no dynamic amax pass)."""
    from vqsuite.kernels.reference import static_act_scale

    model = quantized("per_step")
    layer = model.fc2
    assert static_act_scale(layer) is layer._buffers["act_scale"]  # no step: pooled
    for i, t in enumerate(timesteps(CAL_STEPS)):
        with publish(StepInfo(i, t, CAL_STEPS)):
            s = static_act_scale(layer)
            assert isinstance(s, torch.Tensor) and s.ndim == 0 and s.dtype == torch.float32
            assert float(s) == float(layer.act_scale_steps[i])
    layer.act_observing = True
    with publish(StepInfo(0, 999.0, CAL_STEPS)):
        assert static_act_scale(layer) is None
